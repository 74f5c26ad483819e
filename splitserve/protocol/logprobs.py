"""Logprob results as they cross process boundaries (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's logprob, its rank, and the ``params.logprobs`` most likely tokens."""

    token_id: int  # the sampled token
    logprob: float  # its logprob
    rank: int  # its rank in the distribution (1 = top)
    top: tuple[TopLogprob, ...]  # the params.logprobs most likely tokens (may include the sampled)
