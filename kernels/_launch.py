"""Where a Triton kernel may run, and the argument checks every wrapper shares.

Triton decides at *decoration* time whether `@triton.jit` yields a compiled or an interpreted
function, from `TRITON_INTERPRET`. In a test session some other module may import this package
(and so decorate the kernels) before a conftest sets the variable, so the wrappers do not trust
the decorated object: for CPU tensors they build an interpreted twin from the kernel's Python
source at launch time, which makes the result independent of import order.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def interpret_mode() -> bool:
    """True when `TRITON_INTERPRET` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def available() -> bool:
    """True when the Triton kernels can run here: triton imports and either a CUDA device
    exists or `TRITON_INTERPRET=1` lets them run on CPU tensors through the interpreter."""
    if not _triton_importable():
        return False
    return torch.cuda.is_available() or interpret_mode()


@functools.cache
def _interpreted(fn: Callable[..., Any]) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def launcher(kernel: Any, device: torch.device) -> Any:
    """The launchable form of `kernel` for tensors on `device` (`launcher(k, dev)[grid](...)`)."""
    if device.type == "cuda":
        # Compiled, or interpreted if decorated under TRITON_INTERPRET=1 (the interpreter copies
        # CUDA tensors to the host and back: slow but correct).
        return kernel
    if device.type != "cpu":
        raise RuntimeError(
            f"splitserve.kernels run on CUDA (or CPU when interpreted), not {device}"
        )
    if not interpret_mode():
        raise RuntimeError(
            "Triton kernels need a CUDA device; on CPU tensors they run only under Triton's "
            "interpreter: set TRITON_INTERPRET=1 (or use the torch attention backend)"
        )
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _interpreted(kernel.fn)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, fully planned: the wrappers run it, and a test compiles the very same
    argument list ahead of time for a real GPU target (no device needed)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # num_warps, num_stages

    def run(self, device: torch.device) -> None:
        launcher(self.kernel, device)[self.grid](*self.args, **self.constexprs, **self.options)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for operands upcast from `dtype` to fp32.

    bf16 and fp16 values are exact in tf32 (8 and 10 mantissa bits against tf32's 10, fp32's
    exponent range), so q.k products stay exact on tensor cores; fp32 inputs need "ieee" or
    tf32 rounding would cost ~1e-3 relative error.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int,
    *,
    dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
    device: torch.device | None = None,
    last_contiguous: bool = True,
) -> None:
    """Raise a clear error unless `t` is a tensor of rank `ndim`, an allowed dtype, on `device`,
    with a unit stride on its last dimension (the kernels load head_dim rows as vectors)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} dtype must be one of {allowed}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 on its last dim, got strides {tuple(t.stride())}"
        )


def check_kv_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> None:
    """The paged pool per layer: [num_blocks, block_size, num_kv_heads, head_dim], any dim-0
    stride (per-layer views of the engine's block-major tensor), same shape and dtype for K/V."""
    check_tensor("k_cache", k_cache, 4, device=device)
    check_tensor("v_cache", v_cache, 4, device=device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}"
        )
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise TypeError(f"KV cache dtype {k_cache.dtype}/{v_cache.dtype} must match {dtype}")


def check_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Checks shared by decode and prefill: q [N, Hq, D] against the pool, GQA divisibility,
    int32/int64 block tables and lengths with one row/entry per sequence, `out` like q."""
    check_tensor("q", q, 3)
    device = q.device
    check_kv_cache(k_cache, v_cache, device, q.dtype)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        # tl.dot needs K >= 16; past 256 the fp32 tiles no longer fit in registers.
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})"
        )
    index_dtypes = (torch.int32, torch.int64)
    check_tensor("block_tables", block_tables, 2, dtypes=index_dtypes, device=device)
    check_tensor("seq_lens", seq_lens, 1, dtypes=index_dtypes, device=device)
    if block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"batch mismatch: block_tables has {block_tables.shape[0]} rows, "
            f"seq_lens {seq_lens.shape[0]} entries"
        )
    if out is not None:
        check_tensor("out", out, 3, dtypes=(q.dtype,), device=device)
        if out.shape != q.shape:
            raise ValueError(f"out shape {tuple(out.shape)} must equal q's {tuple(q.shape)}")
