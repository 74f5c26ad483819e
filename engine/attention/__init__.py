"""Attention backends behind one interface: ``cpu`` (torch + a C++ paged decode kernel: the CPU
fast path), ``torch`` (pure torch ops, the fallback where the kernel cannot be built) and
``triton`` (CUDA, or the Triton interpreter)."""

from __future__ import annotations

from splitserve.engine.attention.base import AttentionBackend, AttentionStep
from splitserve.engine.attention.metadata import AttentionMetadata


def resolve_backend_name(name: str, device: str) -> str:
    """The backend ``auto`` means here: triton on CUDA, else cpu where its C++ kernels load
    (building them on first use, which is why this is a function the engine calls once and not
    a config property), else torch."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "triton"
    from splitserve.kernels import cpu

    return "cpu" if cpu.available() else "torch"


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


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "AttentionStep",
    "get_attention_backend",
    "resolve_backend_name",
]
