"""Per-token logprob results and how they are computed from one batch of raw logits.

Logprobs describe the RAW model distribution (``log_softmax`` of the unmodified logits, before
penalties, temperature and top-k/p), which is what vLLM v1 returns by default and what a client
can compare across sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitserve.protocol.logprobs import TokenLogprobs, TopLogprob


def compute_token_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[TokenLogprobs]:
    """Logprob results for a sub-batch of rows.

    ``raw_logits`` [R, V] are the unmodified logits of the rows that asked for logprobs,
    ``token_ids`` [R] the tokens sampled for them and ``num_top[r]`` how many alternatives row r
    wants (0: only the sampled token). One ``log_softmax`` and one ``topk`` serve the whole
    sub-batch; only the final conversion into Python objects loops over rows.
    """
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    sampled = logprobs.gather(1, token_ids.view(-1, 1))  # [R, 1]
    # Rank as vLLM defines it: 1 + the number of tokens strictly more likely than the sampled one.
    ranks = (logprobs > sampled).sum(dim=-1) + 1
    max_top = max(num_top, default=0)
    if max_top > 0:
        top_vals, top_ids = torch.topk(logprobs, min(max_top, logprobs.shape[-1]), dim=-1)
        top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    sampled_l, ranks_l, token_l = sampled.view(-1).tolist(), ranks.tolist(), token_ids.tolist()
    results = []
    for r, k in enumerate(num_top):
        top = (
            tuple(
                TopLogprob(token_id=t, logprob=v, rank=i + 1)
                for i, (t, v) in enumerate(zip(top_ids_l[r][:k], top_vals_l[r][:k], strict=True))
            )
            if k > 0
            else ()
        )
        results.append(
            TokenLogprobs(token_id=token_l[r], logprob=sampled_l[r], rank=ranks_l[r], top=top)
        )
    return results
