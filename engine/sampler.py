"""Turn one step's logits into one token per row: penalties, temperature, top-k/p, min-p, seeds.

The engine hands in the whole batch at once. Every transform is a tensor operation over the rows
that asked for it (a row with no penalty never pays for a count tensor; an all-greedy batch is one
``argmax``). Python loops over rows only build the per-row parameter tensors, draw seeded noise
from each row's own generator, and turn results into Python objects.

Order of processing (vLLM v1 / OpenAI semantics):

1. structured output: tokens the row's grammar forbids (the packed ``TokenBitmask`` the engine
   filled) get logit -inf, for all constrained rows in one op.
2. ``allowed_token_ids``: every other token gets logit -inf.
3. ``logit_bias``: each listed token's bias is added to its logit.
4. ``min_tokens``: until a row has that many output tokens, EOS and its ``stop_token_ids`` are
   forbidden (logit -inf). Not in grammar-constrained rows: there the grammar decides where
   the output may end (banning the only token it allows would leave nothing to sample).
5. repetition penalty (HF / vLLM): over prompt AND output tokens, positive logits are divided by
   the penalty, negative ones multiplied.
6. presence / frequency penalties (OpenAI): over OUTPUT tokens only,
   ``logit -= presence * (count > 0) + frequency * count``.
7. greedy rows (``params.greedy``) take the argmax here and ignore everything below.
8. temperature, then top-k (ties with the k-th value are kept), top-p (keep the smallest set of
   most likely tokens whose mass reaches p), min-p (keep tokens with prob >= min_p * max prob).
9. the exponential race: ``argmax(probs / q)`` with ``q ~ Exp(1)`` i.i.d. per token, which draws
   exactly from ``probs``. Seeded rows draw ``q`` from their own generator, so their tokens do
   not depend on which other rows share the batch; unseeded rows share one draw from the global
   generator.

Logprobs (see ``logprobs.py``) are of the raw logits, before any of the above (so a
grammar-constrained row reports what the model itself thought of the token, as vLLM does).

On the CPU a few whole-row primitives are much faster through numpy views of the same memory
than through torch (measured at 1 thread, [64, 49152] float32: argmax 0.5 vs 3.3 ms, sort of the
values 9 ms vs 250 ms, log 2.4 vs 6.4 ms); ``_cpu`` picks them, other devices keep torch.
"""

from __future__ import annotations

import array
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from xgrammar import apply_token_bitmask_inplace

from splitserve.protocol.sampling import SamplingParams

from .logprobs import TokenLogprobs, TopLogprob, compute_token_logprobs
from .structured_output import TokenBitmask

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "TokenLogprobs", "TopLogprob"]

_NEG_INF = float("-inf")
# Exp(1) noise must stay > 0: q = 0 would turn a masked token's 0 / q into NaN, which argmax picks.
_TINY = float(torch.finfo(torch.float32).tiny)


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
    embedding matrix) are never sampled and do not take part in logprobs. ``eos_token_id`` may
    be one id or several (models with more than one end token); ``min_tokens`` forbids them all.
    """

    def __init__(self, vocab_size: int, eos_token_id: int | Iterable[int] | None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        if eos_token_id is None:
            self.eos_token_ids: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_token_ids = frozenset((eos_token_id,))
        else:
            self.eos_token_ids = frozenset(eos_token_id)

    def __call__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        bitmask: TokenBitmask | None = None,
    ) -> SamplerOutput:
        """Sample one token for each row of ``logits`` [B, V] (float32, V >= vocab_size).

        ``bitmask``: the grammar masks of the constrained rows (``StructuredOutputs``).
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
        raw = logits[:, : self.vocab_size].detach().float()
        x = self._apply_penalties(raw, rows, bitmask)

        rand = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not rand:
            tokens = _argmax(x)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
            greedy = [i for i, r in enumerate(rows) if r.params.greedy]
            if greedy:
                tokens[greedy] = _argmax(x[greedy])
            every = len(rand) == len(rows)
            # Indexing with a list copies: such a copy is ours to modify.
            sub = x if every else x[rand]
            owned = x is not raw or not every
            filtered = _filter(sub, [rows[i].params for i in rand], owned)
            tokens[rand] = _draw(filtered, [rows[i].generator for i in rand])

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if want:
            every = len(want) == len(rows)
            results = compute_token_logprobs(
                raw if every else raw[want],
                tokens if every else tokens[want],
                [rows[i].params.logprobs or 0 for i in want],
            )
            for i, res in zip(want, results, strict=True):
                logprobs[i] = res
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)

    def _apply_penalties(
        self,
        raw: torch.Tensor,
        rows: Sequence[SamplingRow],
        bitmask: TokenBitmask | None = None,
    ) -> torch.Tensor:
        """Steps 1-6 of the module docstring, in order; returns ``raw`` itself if no row asks.

        Each step touches only the (row, token) entries it concerns: the cost is proportional to
        the number of prompt / output / listed tokens involved, not to batch x vocabulary (except
        the grammar and allowed_token_ids, which mask the whole of their rows).
        """
        x = _Logits(raw)
        constrained = _grammar(x, bitmask)
        _allowed_token_ids(x, rows)
        _logit_bias(x, rows)
        _min_tokens(x, rows, self.eos_token_ids, constrained)
        _repetition_penalty(x, rows)
        _presence_frequency(x, rows)
        return x.logits


class _Logits:
    """The logits the steps transform: the raw tensor until a step writes, then a private copy
    (the raw logits stay intact for logprobs)."""

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw = raw
        self.logits = raw
        self.vocab = raw.shape[1]

    def own(self) -> torch.Tensor:
        if self.logits is self.raw:
            self.logits = self.raw.clone()
        return self.logits


def _grammar(x: _Logits, bitmask: TokenBitmask | None) -> frozenset[int]:
    """1. grammar bitmask: xgrammar's kernel over the constrained rows (C++ on the CPU)."""
    if bitmask is None or not bitmask.rows:
        return frozenset()
    t = x.own()
    bits = bitmask.bits.to(t.device)  # filled on the CPU
    apply_token_bitmask_inplace(t, bits, vocab_size=x.vocab, indices=list(bitmask.rows))
    return frozenset(bitmask.rows)


def _allowed_token_ids(x: _Logits, rows: Sequence[SamplingRow]) -> None:
    """2. allowed_token_ids: keep the listed logits, -inf elsewhere in those rows."""
    al = [i for i, r in enumerate(rows) if r.params.allowed_token_ids]
    if not al:
        return
    t = x.own()
    r, ids = _flatten(t.device, al, [rows[i].params.allowed_token_ids for i in al])
    keep = ids < x.vocab  # the engine checks ids against the vocabulary; stay in bounds anyway
    r, ids = r[keep], ids[keep]
    kept = t[r, ids]
    t[al] = _NEG_INF
    t[r, ids] = kept


def _logit_bias(x: _Logits, rows: Sequence[SamplingRow]) -> None:
    """3. logit_bias (token ids are unique within a row: plain assignment, no accumulation)."""
    lb = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if not lb:
        return
    t = x.own()
    biases = [rows[i].params.logit_bias for i in lb]
    r, ids = _flatten(t.device, lb, [(tok for tok, _ in pairs) for pairs in biases])
    bias = torch.tensor([b for pairs in biases for _, b in pairs], device=t.device)
    keep = ids < x.vocab
    r, ids, bias = r[keep], ids[keep], bias[keep]
    t[r, ids] = t[r, ids] + bias


def _min_tokens(
    x: _Logits, rows: Sequence[SamplingRow], eos: frozenset[int], constrained: frozenset[int]
) -> None:
    """4. min_tokens: forbid EOS and stop_token_ids (the grammar decides in its rows)."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        if p.min_tokens and len(row.output_token_ids) < p.min_tokens and i not in constrained:
            for tok in sorted(eos.union(p.stop_token_ids)):
                if tok < x.vocab:
                    r_idx.append(i)
                    t_idx.append(tok)
    if r_idx:
        x.own()[r_idx, t_idx] = _NEG_INF


def _repetition_penalty(x: _Logits, rows: Sequence[SamplingRow]) -> None:
    """5. repetition penalty over prompt + output tokens (duplicates get the same value)."""
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if not rep:
        return
    t = x.own()
    r, ids = _flatten(
        t.device,
        rep,
        [itertools.chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep],
    )
    if r.numel():
        pen = _row_values(rows, rep, "repetition_penalty", 1.0, t.device)[r]
        cur = t[r, ids]
        t[r, ids] = torch.where(cur > 0, cur / pen, cur * pen)


def _presence_frequency(x: _Logits, rows: Sequence[SamplingRow]) -> None:
    """6. presence / frequency penalties over output tokens."""
    pf = [
        i
        for i, r in enumerate(rows)
        if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
        and len(r.output_token_ids) > 0
    ]
    if not pf:
        return
    t = x.own()
    V = x.vocab
    r, ids = _flatten(t.device, pf, [rows[i].output_token_ids for i in pf])
    keys, counts = torch.unique(r * V + ids, return_counts=True)
    r, ids = keys // V, keys % V
    pres = _row_values(rows, pf, "presence_penalty", 0.0, t.device)
    freq = _row_values(rows, pf, "frequency_penalty", 0.0, t.device)
    t[r, ids] -= freq[r] * counts + pres[r]


def _row_values(
    rows: Sequence[SamplingRow], which: list[int], name: str, default: float, device: torch.device
) -> torch.Tensor:
    """[B] float32: ``params.<name>`` of the rows in ``which``, ``default`` elsewhere."""
    values = [default] * len(rows)
    for i in which:
        values[i] = getattr(rows[i].params, name)
    return torch.tensor(values, device=device)


def _flatten(
    device: torch.device, batch_rows: Sequence[int], token_lists: Sequence[Iterable[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch row, token id) index tensors of ragged token lists, one entry per token."""
    # array('q') + frombuffer is ~5x faster than torch.tensor(list) for prompt-sized lists.
    ids = array.array("q")
    lengths: list[int] = []
    for toks in token_lists:
        before = len(ids)
        ids.extend(toks)
        lengths.append(len(ids) - before)
    rows = torch.repeat_interleave(torch.tensor(batch_rows), torch.tensor(lengths))
    tokens = torch.frombuffer(ids, dtype=torch.int64) if ids else torch.empty(0, dtype=torch.long)
    return rows.to(device), tokens.to(device)


def _filter(x: torch.Tensor, params: Sequence[SamplingParams], owned: bool) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p; removed tokens get -inf.

    Works in place when ``owned`` (else on a copy made only if some row needs a change) and
    returns the result.
    """
    V = x.shape[1]
    temps = [p.temperature for p in params]
    uniform_temp = all(t == temps[0] for t in temps)
    kp = [j for j, p in enumerate(params) if 0 < p.top_k < V or p.top_p < 1.0]
    mp = [j for j, p in enumerate(params) if p.min_p > 0.0]
    if (uniform_temp and temps[0] == 1.0) and not kp and not mp:
        return x
    if not owned:
        x = x.clone()
    if not uniform_temp:
        x.div_(torch.tensor(temps, device=x.device).unsqueeze(1))
    elif temps[0] != 1.0:
        x.div_(temps[0])
    if kp:
        cut = _top_k_top_p_cut(
            x if len(kp) == len(params) else x[kp],
            [params[j].top_k if 0 < params[j].top_k < V else V for j in kp],
            [params[j].top_p if params[j].top_p < 1.0 else math.inf for j in kp],
        )
        _mask_below(x, kp, cut)
    if mp:
        # prob >= min_p * max_prob  <=>  logit >= max_logit + log(min_p)
        sub = x if len(mp) == len(params) else x[mp]
        log_min_p = torch.tensor([math.log(params[j].min_p) for j in mp], device=x.device)
        _mask_below(x, mp, _row_max(sub) + log_min_p)
    return x


def _top_k_top_p_cut(x: torch.Tensor, ks: Sequence[int], ps: Sequence[float]) -> torch.Tensor:
    """Per row of ``x`` [R, V], the smallest logit that top-k (k) then top-p (p) keep.

    top-k keeps every token whose logit is >= the k-th largest (ties kept, as vLLM does; k = V
    disables it). top-p then keeps token i of the descending order iff the probability mass of
    the tokens before it is < p (p = inf disables it), so the most likely token always survives.
    Both become one logit threshold per row, so ties with the threshold are kept.
    """
    if all(math.isinf(p) for p in ps):
        # top-k only: the k-th largest value needs just the max(k) largest, unordered.
        top = _largest_descending(x, max(ks))
        return top.gather(1, _column(ks, x.device).sub_(1)).squeeze(1)
    vals = _sorted_descending(x)
    kth = vals.gather(1, _column(ks, x.device).sub_(1))  # [R, 1]
    vals.masked_fill_(vals < kth, _NEG_INF)
    probs = vals.softmax(dim=-1)
    # Mass strictly before each position: a shifted cumsum is monotone, so "keep" is a prefix.
    before = torch.zeros_like(probs)
    torch.cumsum(probs[:, :-1], dim=-1, out=before[:, 1:])
    n_keep = (before < _column(ps, x.device)).sum(dim=-1, keepdim=True)
    return torch.maximum(vals.gather(1, n_keep.sub_(1)), kth).squeeze(1)


def _column(values: Sequence[float] | Sequence[int], device: torch.device) -> torch.Tensor:
    """Per-row parameters as an [R, 1] column (int64 for ints, float32 for floats)."""
    return torch.tensor(values, device=device).unsqueeze(1)


def _mask_below(x: torch.Tensor, rows: list[int], cut: torch.Tensor) -> None:
    """Set the entries of ``x[rows]`` strictly below each row's ``cut`` [len(rows)] to -inf."""
    if len(rows) == x.shape[0]:
        x.masked_fill_(x < cut.unsqueeze(1), _NEG_INF)
    else:
        sub = x[rows]
        x[rows] = sub.masked_fill_(sub < cut.unsqueeze(1), _NEG_INF)


def skip_draw(generator: torch.Generator, vocab_width: int) -> None:
    """Advance a seeded generator exactly as sampling one (non-greedy) token would.

    Used when that token was sampled by another engine (the prefill pod), so the rest of the
    sequence draws the same numbers it would have drawn in a single engine.
    """
    torch.empty(vocab_width, dtype=torch.float32).uniform_(generator=generator)


def _draw(x: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Exponential race over the filtered logits ``x`` [R, V] (not modified): one token per row.

    ``argmax(probs / q)`` with ``q = -log(u)``, ``u ~ U[0, 1)``: i.i.d. Exp(1) noise, drawn as
    uniforms because torch's vectorised uniform kernel is several times cheaper on the CPU than
    ``exponential_``. Each seeded row draws exactly V uniforms from its own generator per call,
    so its token depends only on its own logits and generator state.
    """
    R, V = x.shape
    u = torch.empty_like(x)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if len(unseeded) == R:
        u.uniform_()
    elif unseeded:
        u[unseeded] = torch.rand(len(unseeded), V, dtype=x.dtype, device=x.device)
    for j, g in enumerate(generators):
        if g is not None:
            u[j].uniform_(generator=g)
    # u == 0 gives q = inf: score 0, a 2^-24 event per token. The clamp keeps q > 0 should
    # -log(u) round to 0, so a masked token (prob 0) scores 0, never NaN.
    q = _neg_log_(u).clamp_min_(_TINY)
    return _argmax(torch.softmax(x, dim=-1).div_(q))


# -- whole-row primitives: numpy views on the CPU, torch elsewhere ------------------------------


def _cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not x.requires_grad


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax [R] (int64); the first maximal index on ties, as torch.argmax."""
    if _cpu(x):
        return torch.from_numpy(np.ascontiguousarray(x.numpy().argmax(axis=-1), dtype=np.int64))
    return x.argmax(dim=-1)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maximum [R]."""
    if _cpu(x):
        return torch.from_numpy(x.numpy().max(axis=-1))
    return x.max(dim=-1).values


def _sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values sorted in descending order, as a new [R, V] tensor (no indices)."""
    if _cpu(x):
        return _reversed(np.sort(x.numpy(), axis=-1))
    return x.sort(dim=-1, descending=True).values


def _largest_descending(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k largest values in descending order, [R, k]."""
    V = x.shape[1]
    if k >= V // 4 or not _cpu(x):
        return _sorted_descending(x) if k >= V // 4 else torch.topk(x, k, dim=-1).values
    part = np.partition(x.numpy(), V - k, axis=-1)[:, V - k :]
    return _reversed(np.sort(part, axis=-1))


def _reversed(a: np.ndarray) -> torch.Tensor:
    # .copy(), not ascontiguousarray: the latter keeps a negative stride on [R, 1] arrays.
    return torch.from_numpy(a[:, ::-1].copy())


def _neg_log_(u: torch.Tensor) -> torch.Tensor:
    """``-log(u)`` in place."""
    if _cpu(u) and u.is_contiguous():
        a = u.numpy()
        with np.errstate(divide="ignore"):  # log(0) = -inf is expected and handled
            np.log(a, out=a)
        np.negative(a, out=a)
        return u
    return u.log_().neg_()
