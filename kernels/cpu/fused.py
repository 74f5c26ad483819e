"""The decoder's small elementwise steps as single C++ ops (``fused_ops.cpp``), each beside the
torch code it replaces (``*_ref``: HF's eager Llama, which the tests compare against).

At batch 1 a decode step runs ~25 torch ops per layer whose arithmetic is negligible; each op's
dispatch and allocation is what costs. These fold them: RMSNorm (with the residual add before
it), SiLU(gate) * up, the rotary embedding in place, and the K/V cache write.
"""

from __future__ import annotations

import torch

from splitserve.kernels import cpu


def _ops():
    ops = cpu.load()
    if ops is None:
        raise RuntimeError("splitserve C++ CPU kernels are not available (see the log)")
    return ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim of ``x`` [rows, H]."""
    return _ops().rms_norm(x, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place (in the dtype), then ``rms_norm(residual)``."""
    return _ops().add_rms_norm(x, residual, weight, eps)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    residual.copy_(residual + x)
    return rms_norm_ref(residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[rows, 2 * I]`` projection -> ``[rows, I]``."""
    return _ops().silu_mul(gate_up)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``x = x * cos + rotate_half(x) * sin`` in place; x [T, H, D] (contiguous heads), cos/sin
    [>= T, D] in x's dtype."""
    _ops().rotary_(x, cos, sin)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t, half = x.shape[0], x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:t, None, :] + rotated * sin[:t, None, :]


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy token t's K and V ([T, Hkv, D]) into slot ``slot_mapping[t]`` of the per-layer cache
    views ``[blocks, block_size, Hkv, D]`` (negative slots: padding, skipped)."""
    _ops().write_kv(k, v, k_cache, v_cache, slot_mapping)


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k[keep]
    v_cache[slots // bs, slots % bs] = v[keep]
