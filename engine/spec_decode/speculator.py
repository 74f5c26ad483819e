"""What the engine asks of speculative decoding: drafts before a step, verdicts after it.

The scheduler stays the one rule (``num_computed_tokens`` catches up to the tokens): a request's
drafts (``Request.spec_token_ids``, never part of its tokens) are scheduled as extra new tokens,
the step computes logits at each of them, and the engine keeps the longest run of drafts the
target model itself would have sampled (``accepted_prefix``), plus the token the target sampled
after that run. Rejected drafts roll back ``num_computed_tokens`` (and their KV blocks are
trimmed); they never reach ``all_token_ids``, so prefix-cache hashes only cover accepted tokens.

Which requests speculate: every running request that has sampled its first token and is caught
up. Every sampling feature composes because each verified position is sampled as its own row
with exactly the state non-speculative decoding would have there: grammar masks are filled for
each position by walking the drafts before it and rolling the matcher back, penalties and
min_tokens see the drafts before it as output tokens, logit_bias, allowed_token_ids,
temperature, top-k/p and min-p apply per row, logprobs are of each row's raw logits, stop
strings / stop tokens / max_tokens are checked token by token (what follows a finish is
dropped), n > 1 samples draft independently, and a seeded row's generator is wound
back to the draws of the tokens it kept (so seeded output equals non-speculative output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from splitserve.engine.request import Request
from splitserve.engine.spec_decode.config import SpeculativeConfig
from splitserve.engine.spec_decode.ngram import NgramProposer


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        """Up to ``limits[i]`` draft tokens to follow request i's tokens (0: none)."""
        ...


@dataclass(frozen=True)
class SpecDecodeStats:
    """Counters since the engine started (vLLM's ``spec_decode_*`` metrics)."""

    num_drafts: int = 0  # verifications: requests x steps that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()  # [i]: drafts accepted at draft position i

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification: 1 (the target's own) + accepted drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def accepted_prefix(targets: Sequence[int], drafts: Sequence[int]) -> int:
    """How many leading drafts equal what the target sampled at their positions.

    ``targets[j]`` is the token the target model sampled after the request's tokens and
    ``drafts[:j]``. Draft j is kept iff it equals ``targets[j]``: for a draft that is one token
    (n-gram lookup, greedy draft models) this is exact rejection sampling (the draft is accepted
    with probability p(draft); on rejection ``targets[j]`` is a draw from p conditioned on not
    being the draft, i.e. the residual distribution), so the output is distributed exactly as
    the target's, and greedy output is token-identical.
    """
    a = 0
    for draft, target in zip(drafts, targets, strict=False):
        if draft != target:
            break
        a += 1
    return a


class Speculator:
    """One per engine with a ``speculative_config``: proposes drafts and counts acceptance."""

    def __init__(
        self, config: SpeculativeConfig, max_model_len: int, proposer: Proposer | None = None
    ) -> None:
        """``proposer``: the draft model's (method draft_model, made by the engine, which owns
        the attention backend and pool size); n-gram lookup needs none."""
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        if proposer is None:
            if config.method != "ngram":
                raise ValueError(f"speculative method {config.method!r} needs its proposer")
            proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        self.proposer = proposer
        self._num_drafts = self._num_draft_tokens = self._num_accepted = 0
        self._per_position = [0] * self.k

    def draft_limit(self, req: Request) -> int:
        """The most drafts ``req`` may verify in its next step (0: it decodes plainly)."""
        if req.num_output_tokens == 0 or req.num_computed_tokens != req.num_tokens - 1:
            return 0  # prompt not done, or catching up after preemption
        params = req.params
        limit = min(self.k, self.max_model_len - req.num_tokens)  # KV positions must exist
        if params.max_tokens is not None:  # one more token always comes from the target
            limit = min(limit, params.max_tokens - req.num_output_tokens - 1)
        return max(limit, 0)

    def propose(self, running: Sequence[Request]) -> None:
        """Set ``spec_token_ids`` of every running request (empty where it does not speculate)."""
        batch_cap = self.config.disable_by_batch_size
        if batch_cap is not None and len(running) > batch_cap:
            for req in running:
                req.spec_token_ids = []
            return
        limits = [self.draft_limit(r) for r in running]
        drafts = self.proposer.propose(running, limits)
        for req, draft in zip(running, drafts, strict=True):
            req.spec_token_ids = draft

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One request's verification: ``num_drafts`` verified, the first ``num_accepted`` kept."""
        self._num_drafts += 1
        self._num_draft_tokens += num_drafts
        self._num_accepted += num_accepted
        for i in range(num_accepted):
            self._per_position[i] += 1

    def check_integrity(self) -> None:
        """The proposer's own books, where it keeps any (a draft model's KV pool)."""
        check = getattr(self.proposer, "check_integrity", None)
        if check is not None:
            check()

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(
            self._num_drafts, self._num_draft_tokens, self._num_accepted, tuple(self._per_position)
        )
