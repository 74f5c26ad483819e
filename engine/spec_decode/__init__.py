"""Speculative decoding inside the token-budget scheduler: n-gram prompt lookup or a draft model
proposes, the target verifies every draft in one forward pass, exact acceptance keeps the target's
distribution (``speculator.py``). This package's ``config`` is torch-free (flags are checked with
it before an engine starts)."""

from splitserve.engine.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
