"""Attention backends behind one interface: ``cpu`` (torch + a C++ paged decode kernel: the CPU
fast path), ``torch`` (pure torch ops, the fallback where the kernel cannot be built) and
``triton`` (CUDA, or the Triton interpreter)."""

from __future__ import annotations

from splitserve.engine.attention.base import AttentionBackend, AttentionStep
from splitserve.engine.attention.metadata import AttentionMetadata


def get_attention_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from splitserve.engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from splitserve.engine.attention.torch_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    if name == "triton":
        from splitserve.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be cpu, torch or triton, got {name!r}")


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionStep", "get_attention_backend"]
