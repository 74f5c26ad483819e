"""What this CPU computes fast, read once at run time (the CPU model changes between machines).

bfloat16 matmuls are fast in torch only where the CPU has native bf16 dot products (AVX512-BF16,
AMX-BF16); elsewhere torch emulates them and a bf16 model ran ~3x slower than the same model in
float32. ``dtype="auto"`` follows ``native_bf16()``. On AVX-512 CPUs without native bf16 the
engine's own dense kernel now runs decode-sized bf16 matmuls (``model/llama.py``, ``Linear``), and
``--dtype bfloat16`` there is faster than float32 at small batches (docs/benchmarks.md); auto
still picks float32 there, the model's reference numerics.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is none to read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (x86 AVX512-BF16 / AMX, or Arm's BF16 extension)."""
    flags = cpu_flags()
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & _BF16_FLAGS)
