"""Turn one step's logits into one token per row: penalties, temperature, top-k/p, min-p, seeds.

The engine hands in the whole batch at once. Every transform is a tensor operation over the rows
that asked for it (a row with no penalty never pays for a count tensor; an all-greedy batch is one
``argmax``). Python loops over rows only build the per-row parameter tensors, draw seeded noise
from each row's own generator, and turn results into Python objects.

Order of processing (vLLM v1 / OpenAI semantics):

1. ``min_tokens``: until a row has that many output tokens, EOS and its ``stop_token_ids`` are
   forbidden (logit -inf).
2. repetition penalty (HF / vLLM): over prompt AND output tokens, positive logits are divided by
   the penalty, negative ones multiplied.
3. presence / frequency penalties (OpenAI): over OUTPUT tokens only,
   ``logit -= presence * (count > 0) + frequency * count``.
4. greedy rows (``params.greedy``) take the argmax here and ignore everything below.
5. temperature, then top-k (ties with the k-th value are kept), top-p (keep the smallest set of
   most likely tokens whose mass reaches p), min-p (keep tokens with prob >= min_p * max prob).
6. the exponential race: ``argmax(probs / q)`` with ``q ~ Exp(1)`` i.i.d. per token, which draws
   exactly from ``probs``. It is computed as ``argmax(logits - log q)`` (same argmax, no
   underflow). Seeded rows draw ``q`` from their own generator, so their tokens do not depend on
   which other rows share the batch; unseeded rows share one draw from the global generator.

Logprobs (see ``logprobs.py``) are of the raw logits, before any of the above.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .logprobs import TokenLogprobs, TopLogprob, compute_token_logprobs
from .sampling_params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "TokenLogprobs", "TopLogprob"]

_NEG_INF = float("-inf")
# Exp(1) draws can be exactly 0 in float32; log(0) would turn a masked (-inf) token into NaN.
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplingRow:
    """One row of the logits batch as the engine hands it in."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far (for penalties / min_tokens)
    # Set iff params.seed is not None; owned by the engine (one per sample), advanced by us.
    # A row without one is sampled from the global generator.
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, and its logprobs where the row asked for them."""

    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # per row; None unless params.logprobs is not None


class Sampler:
    """Stateless batch sampler; one instance per engine.

    ``vocab_size`` is the number of real tokens: logits columns beyond it (padding of the
    embedding matrix) are never sampled and do not take part in logprobs.
    """

    def __init__(self, vocab_size: int, eos_token_id: int | None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Sample one token for each row of ``logits`` [B, V] (float32, V >= vocab_size).

        Does not modify ``logits``. Advances the generators of seeded rows.
        """
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows), V] = [{len(rows)}, V], got {tuple(logits.shape)}"
            )
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns < vocab {self.vocab_size}")
        if not rows:
            return SamplerOutput(token_ids=[], logprobs=[])
        raw = logits[:, : self.vocab_size].float()
        x = self._apply_penalties(raw, rows)

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if len(greedy) == len(rows):
            tokens = x.argmax(dim=-1)
        else:
            rand = [i for i, r in enumerate(rows) if not r.params.greedy]
            tokens = torch.empty(len(rows), dtype=torch.long)
            if greedy:
                tokens[greedy] = x[greedy].argmax(dim=-1)
            # Indexing with a list copies, so the random path may work in place.
            sub = x[rand] if len(rand) < len(rows) or x is raw else x
            tokens[rand] = self._sample(sub, [rows[i] for i in rand])

        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            results = compute_token_logprobs(
                raw[want], tokens[want], [rows[i].params.logprobs or 0 for i in want]
            )
            for i, res in zip(want, results, strict=True):
                logprobs[i] = res
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)

    # -- logit processors (before temperature) --------------------------------------------------

    def _apply_penalties(self, raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """min_tokens, repetition, presence and frequency; returns ``raw`` itself if no row asks."""
        V = raw.shape[1]
        x = raw

        def own() -> torch.Tensor:
            return raw.clone() if x is raw else x

        # 1. min_tokens: forbid EOS and stop_token_ids.
        r_idx: list[int] = []
        t_idx: list[int] = []
        for i, row in enumerate(rows):
            p = row.params
            if p.min_tokens and len(row.output_token_ids) < p.min_tokens:
                stops = set(p.stop_token_ids)
                if self.eos_token_id is not None:
                    stops.add(self.eos_token_id)
                for t in sorted(stops):
                    if t < V:
                        r_idx.append(i)
                        t_idx.append(t)
        if r_idx:
            x = own()
            x[r_idx, t_idx] = _NEG_INF

        # 2. repetition penalty over prompt + output tokens.
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            x = own()
            seen = _token_mask(
                [itertools.chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep],
                V,
            )
            pen = torch.tensor([rows[i].params.repetition_penalty for i in rep]).unsqueeze(1)
            sub = x[rep]
            penalised = torch.where(sub > 0, sub / pen, sub * pen)
            x[rep] = torch.where(seen, penalised, sub)

        # 3. presence / frequency penalties over output tokens.
        pf = [
            i
            for i, r in enumerate(rows)
            if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
            and len(r.output_token_ids) > 0
        ]
        if pf:
            x = own()
            counts = _token_counts([rows[i].output_token_ids for i in pf], V)
            pres = torch.tensor([rows[i].params.presence_penalty for i in pf]).unsqueeze(1)
            freq = torch.tensor([rows[i].params.frequency_penalty for i in pf]).unsqueeze(1)
            x[pf] = x[pf] - freq * counts - pres * (counts > 0).float()
        return x

    # -- random sampling ----------------------------------------------------------------------

    def _sample(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Sample one token per row of ``x`` [R, V] (owned: modified in place); no greedy rows."""
        return _draw(_filter(x, [r.params for r in rows]), [r.generator for r in rows])


def _filter(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on ``x`` [R, V] in place; removed tokens get -inf."""
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        x.div_(torch.tensor(temps).unsqueeze(1))
    _top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    mp = [j for j, p in enumerate(params) if p.min_p > 0.0]
    if mp:
        # prob >= min_p * max_prob  <=>  logit >= max_logit + log(min_p)
        sub = x[mp]
        log_min_p = torch.tensor([math.log(params[j].min_p) for j in mp]).unsqueeze(1)
        threshold = sub.max(dim=-1, keepdim=True).values + log_min_p
        x[mp] = sub.masked_fill(sub < threshold, _NEG_INF)
    return x


def _draw(x: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Exponential race over the filtered logits ``x`` [R, V] (consumed): one token per row.

    Each seeded row draws exactly V noise values from its own generator per call, so its result
    depends only on its own logits and generator state.
    """
    R, V = x.shape
    q = torch.empty_like(x)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if len(unseeded) == R:
        q.exponential_()
    elif unseeded:
        q[unseeded] = torch.empty(len(unseeded), V).exponential_()
    for j, g in enumerate(generators):
        if g is not None:
            q[j].exponential_(generator=g)
    return x.sub_(q.clamp_min_(_TINY).log_()).argmax(dim=-1)


def _top_k_top_p(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> None:
    """Mask (in place, -inf) the tokens that top-k then top-p remove, on the rows that ask.

    top-k keeps every token whose logit is >= the k-th largest one (ties kept, as vLLM does).
    top-p keeps token i (in descending order) iff the mass of the tokens ranked strictly above it
    is < p, so the most likely token always survives.
    """
    V = x.shape[1]
    k_rows = [j for j, k in enumerate(top_k) if 0 < k < V]
    p_rows = [j for j, p in enumerate(top_p) if p < 1.0]
    if not k_rows and not p_rows:
        return
    if not p_rows:
        # top-k only: a partial selection is much cheaper than a full sort.
        sub = x[k_rows]
        ks = torch.tensor([top_k[j] for j in k_rows])
        top = torch.topk(sub, int(ks.max()), dim=-1).values
        kth = top.gather(1, (ks - 1).unsqueeze(1))
        x[k_rows] = sub.masked_fill(sub < kth, _NEG_INF)
        return
    rows = sorted(set(k_rows) | set(p_rows))
    sub = x[rows]
    vals, idx = sub.sort(dim=-1, descending=True)
    ks = torch.tensor([top_k[j] if 0 < top_k[j] < V else V for j in rows])
    kth = vals.gather(1, (ks - 1).unsqueeze(1))
    vals.masked_fill_(vals < kth, _NEG_INF)
    # Disabled top-p must not drop anything even when the cumulative sum rounds past 1.
    ps = torch.tensor([top_p[j] if top_p[j] < 1.0 else math.inf for j in rows]).unsqueeze(1)
    probs = vals.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    vals.masked_fill_(mass_above >= ps, _NEG_INF)
    x[rows] = torch.empty_like(sub).scatter_(1, idx, vals)


def _flatten(token_lists: Sequence[Sequence[int] | itertools.chain[int]]) -> tuple[list, list]:
    """(row index, token id) pairs of ragged token lists, as two flat lists."""
    row_idx: list[int] = []
    ids: list[int] = []
    for r, toks in enumerate(token_lists):
        before = len(ids)
        ids.extend(toks)
        row_idx.extend(itertools.repeat(r, len(ids) - before))
    return row_idx, ids


def _token_mask(
    token_lists: Sequence[Sequence[int] | itertools.chain[int]], V: int
) -> torch.Tensor:
    """[R, V] bool: which tokens occur in each row's list."""
    row_idx, ids = _flatten(token_lists)
    mask = torch.zeros(len(token_lists), V, dtype=torch.bool)
    if ids:
        mask[torch.tensor(row_idx), torch.tensor(ids)] = True
    return mask


def _token_counts(token_lists: Sequence[Sequence[int]], V: int) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each row's list."""
    row_idx, ids = _flatten(token_lists)
    counts = torch.zeros(len(token_lists), V)
    if ids:
        counts.index_put_(
            (torch.tensor(row_idx), torch.tensor(ids)), torch.ones(len(ids)), accumulate=True
        )
    return counts
