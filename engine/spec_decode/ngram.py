"""N-gram prompt lookup (vLLM's ``method: ngram``): drafts copied from the request's own tokens.

The longest suffix of the sequence (``prompt_lookup_min`` to ``prompt_lookup_max`` tokens) that
also occurs earlier in it is looked up; the tokens that followed its earliest occurrence are the
draft. Nothing is learned or stored: the proposal is a pure function of the request's tokens, so
it never drifts from them (drafts are never part of a request's tokens until accepted).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from splitserve.engine.request import Request


def ngram_draft(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the earliest earlier occurrence of the longest suffix
    of ``tokens`` with ``min_n <= length <= max_n``; [] when there is none.

    Candidates are the earlier positions holding the last token (one vectorised compare over
    the sequence); only those are extended backwards, at most ``max_n - 1`` times.
    """
    n = len(tokens)
    if k <= 0 or n < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    ends = np.flatnonzero(arr[: n - 1] == arr[n - 1])  # occurrences ending before the suffix
    if ends.size == 0:
        return []
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, max_n):
        if n - 1 - j < 0:
            break
        pos = ends - j
        ok = alive & (pos >= 0)
        ok[ok] = arr[pos[ok]] == arr[n - 1 - j]
        if not ok.any():
            break
        length += ok
        alive = ok
    best = int(length.max())
    if best < min_n:
        return []
    start = int(ends[int(np.argmax(length == best))]) + 1  # earliest of the longest matches
    return arr[start : start + k].tolist()


class NgramProposer:
    """Drafts for a batch of requests by prompt lookup (no model, no state)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        """``limits[i]``: the most drafts request i may take (0: none)."""
        return [
            ngram_draft(r.all_token_ids, self.min_n, self.max_n, k) if k > 0 else []
            for r, k in zip(requests, limits, strict=True)
        ]
