"""`reshape_and_cache`: scatter new K/V rows into their slots of the paged block pool.

Each program copies the [num_kv_heads, head_dim] rows of K and V of a few tokens (about 4K
elements per program; fewer, larger programs also keep Triton's interpreter fast) to
`block = slot // block_size`, `offset = slot % block_size`. A negative slot marks a padding
token (e.g. a CUDA-graph batch padded to a fixed size) and is skipped. Pure data movement: values
are stored bit-exactly, so bf16 needs no fp32 detour here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch, check_kv_cache, check_tensor, next_pow2

_ROW_ELEMENTS = 4096  # elements of K (and as many of V) copied per program


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_tokens,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    num_kv_heads,
    head_dim,
    block_size,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    # One token's [Hkv, D] rows flattened into a single vector axis.
    hd = tl.arange(0, BLOCK_H * BLOCK_D)
    h = hd // BLOCK_D
    d = hd % BLOCK_D
    mask = (slot >= 0)[:, None] & ((h < num_kv_heads) & (d < head_dim))[None, :]
    t64 = t.to(tl.int64)[:, None]
    k = tl.load(key_ptr + t64 * stride_kt + (h * stride_kh + d)[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + (h * stride_vh + d)[None, :], mask=mask)
    row = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    dst = row[:, None] + (h * stride_ch + d)[None, :]
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def _check(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check_tensor("key", key, 3)
    device, dtype = key.device, key.dtype
    check_tensor("value", value, 3, device=device)
    if value.shape != key.shape or value.dtype != dtype:
        raise ValueError(
            f"value {tuple(value.shape)}/{value.dtype} must match key {tuple(key.shape)}/{dtype}"
        )
    check_kv_cache(k_cache, v_cache, device, dtype)
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"key rows [Hkv, D]={tuple(key.shape[1:])} do not match the cache's "
            f"{tuple(k_cache.shape[2:])}"
        )
    check_tensor("slot_mapping", slot_mapping, 1, dtypes=(torch.int64, torch.int32), device=device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens"
        )


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write `key`/`value` [T, Hkv, D] into `k_cache`/`v_cache` [num_blocks, block_size, Hkv, D]
    at `slot_mapping` [T] (int64; `slot = block * block_size + offset`, negative = skip).

    Mutates only the addressed cache rows. Slots must be distinct among non-negative entries
    (two tokens writing one slot race) and below num_blocks * block_size.
    """
    _check(key, value, k_cache, v_cache, slot_mapping)
    if key.shape[0] == 0:
        return
    plan_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping).run(key.device)


def plan_reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> Launch:
    """The launch of one (checked) `reshape_and_cache` call: BLOCK_T tokens per program."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    block_t = max(1, min(_ROW_ELEMENTS // (block_h * block_d), next_pow2(num_tokens)))
    return Launch(
        _reshape_and_cache_kernel,
        (triton.cdiv(num_tokens, block_t),),
        (
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            num_tokens,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            num_kv_heads,
            head_dim,
            k_cache.shape[1],
        ),
        dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d),
    )


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference of `reshape_and_cache` (same contract, same checks)."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep]
    v_cache[blocks, offsets] = value[keep]
