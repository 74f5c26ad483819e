"""Attention backends behind one interface: ``torch`` (the CPU fast path) and ``triton``."""

from __future__ import annotations

from splitserve.services.engine.attention.base import AttentionBackend, AttentionStep
from splitserve.services.engine.attention.metadata import AttentionMetadata


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from splitserve.services.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from splitserve.services.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be torch or triton, got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionStep", "get_attention_backend"]
