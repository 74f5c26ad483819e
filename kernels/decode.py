"""`paged_decode_attention`: one query token per sequence against its paged KV, split-K.

Phase 1 runs one program per (sequence, KV head, context partition of `partition_size` tokens).
It loads the whole query group of that KV head (GQA: Hq / Hkv query heads, padded to 16 rows so
`tl.dot` can use tensor cores), walks the partition in tiles of BLOCK_N tokens gathered through
the block table, and keeps an online softmax (running max `m`, running sum `l`, unnormalized
accumulator). With more than one partition it writes the normalized partial output plus `m` and
`l`; phase 2 merges the partials per (sequence, query head): weight_p = l_p * 2^(m_p - max m).
When every sequence fits in one partition phase 1 writes the final output directly.

All math is fp32 (Triton's interpreter computes bf16 wrongly, and it is more accurate anyway);
scores are kept in the log2 domain (`scale * log2(e)` folded into q.k) so exp2 is used.
The number of partitions comes from a host-side `max_seq_len` when the caller knows it, else from
the block table's width, never from max(seq_lens): no host sync; partitions past a sequence's end
exit at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import Launch, check_attention, dot_precision, next_pow2

DEFAULT_PARTITION_SIZE = 512
_BLOCK_N = 32  # tokens per tile: 64 spills registers on sm_90 at head_dim 128 (ptxas -v)
_NUM_WARPS = 4
_MIN_DOT_ROWS = 16  # tl.dot needs M >= 16


@triton.jit
def _decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    scale_log2,
    num_heads,
    head_dim,
    block_size,
    max_parts,
    QUERY_GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = part * PARTITION_SIZE
    if start >= seq_len:
        return
    end = tl.minimum(seq_len, start + PARTITION_SIZE)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kvh * QUERY_GROUP + g
    g_mask = g < QUERY_GROUP
    d_mask = d < head_dim
    b64 = b.to(tl.int64)
    q_offs = b64 * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32)

    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + b64 * stride_bt
    for tile in range(start, end, BLOCK_N):
        pos = tile + n
        valid = pos < end
        blk = tl.load(bt_row + pos // block_size, mask=valid, other=0).to(tl.int64)
        rows = blk * stride_cb + (pos % block_size) * stride_cs + kvh * stride_ch
        kv_offs = rows[:, None] + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        # The first tile of a partition always holds a valid token, so m_new is finite.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new

    acc = acc / row_sum[:, None]
    if SPLIT:
        stat = (b64 * num_heads + heads) * max_parts + part
        store_mask = g_mask[:, None] & d_mask[None, :]
        tl.store(part_out_ptr + stat[:, None] * head_dim + d[None, :], acc, mask=store_mask)
        tl.store(part_max_ptr + stat, m, mask=g_mask)
        tl.store(part_sum_ptr + stat, row_sum, mask=g_mask)
    else:
        o_offs = b64 * stride_ob + heads[:, None] * stride_oh + d[None, :]
        o = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + o_offs, o, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    seq_lens_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    head_dim,
    max_parts,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    num_parts = tl.cdiv(seq_len, PARTITION_SIZE)
    base = (b.to(tl.int64) * num_heads + h) * max_parts
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim

    top = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    for c in range(0, num_parts, BLOCK_P):
        pm = c + p < num_parts
        top = tl.maximum(top, tl.load(part_max_ptr + base + c + p, mask=pm, other=float("-inf")))
    m_all = tl.max(top, axis=0)

    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, num_parts, BLOCK_P):
        pm = c + p < num_parts
        mx = tl.load(part_max_ptr + base + c + p, mask=pm, other=float("-inf"))
        sm = tl.load(part_sum_ptr + base + c + p, mask=pm, other=0.0)
        w = tl.where(pm, sm * tl.exp2(mx - m_all), 0.0)
        total += w
        o_offs = (base + c + p)[:, None] * head_dim + d[None, :]
        o = tl.load(part_out_ptr + o_offs, mask=pm[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
    res = acc / tl.sum(total, axis=0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    check_attention(q, k_cache, v_cache, block_tables, seq_lens, out)
    if seq_lens.shape[0] != q.shape[0]:
        raise ValueError(f"batch {q.shape[0]} (q) but seq_lens has {seq_lens.shape[0]} entries")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] (dim 0 may be strided);
    block_tables [B, max_blocks] int32; seq_lens [B] int32, 1 <= seq_lens[b] <=
    max_blocks * block_size, counting the current token, whose K/V is already in the cache.
    Returns `out` (allocated if None) [B, Hq, D] in q's dtype. `partition_size` (a power of two
    >= 16) is the split-K chunk; contexts longer than it are split and reduced.
    `max_seq_len` (>= every seq_lens[b], known on the host) sizes the partition grid; without
    it the block table's width does, which may launch empty partitions and the reduce pass
    where one partition would do.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens, out)
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    capacity = block_tables.shape[1] * k_cache.shape[1]
    if max_seq_len is None:
        max_seq_len = capacity
    elif not 0 < max_seq_len <= capacity:
        raise ValueError(
            f"max_seq_len must be in [1, {capacity}] (block table width x block size), "
            f"got {max_seq_len}"
        )
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for launch in plan_decode(
        q, k_cache, v_cache, block_tables, seq_lens, scale, out, partition_size, max_seq_len
    ):
        launch.run(q.device)
    return out


def plan_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    partition_size: int,
    max_seq_len: int,
) -> list[Launch]:
    """The launches of one (checked) decode call: the partition pass and, when a context of
    `max_seq_len` spans more than one partition, the reduce pass; allocates the fp32 partials."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return []
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_parts = max(1, triton.cdiv(max_seq_len, partition_size))
    split = max_parts > 1
    if split:
        part_out = torch.empty(
            (batch, num_heads, max_parts, head_dim), dtype=torch.float32, device=q.device
        )
        part_max = torch.empty((batch, num_heads, max_parts), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:  # never touched: SPLIT is a compile-time False
        part_out = part_max = part_sum = out
    block_d = next_pow2(head_dim)
    launches = [
        Launch(
            _decode_partition_kernel,
            (batch, num_kv_heads, max_parts),
            (
                q,
                k_cache,
                v_cache,
                block_tables,
                seq_lens,
                out,
                part_out,
                part_max,
                part_sum,
                q.stride(0),
                q.stride(1),
                out.stride(0),
                out.stride(1),
                k_cache.stride(0),
                k_cache.stride(1),
                k_cache.stride(2),
                block_tables.stride(0),
                float(scale) * math.log2(math.e),
                num_heads,
                head_dim,
                block_size,
                max_parts,
            ),
            dict(
                QUERY_GROUP=group,
                G_PAD=max(_MIN_DOT_ROWS, next_pow2(group)),
                BLOCK_D=block_d,
                BLOCK_N=min(_BLOCK_N, partition_size),
                PARTITION_SIZE=partition_size,
                SPLIT=split,
                DOT_PRECISION=dot_precision(q.dtype),
            ),
            dict(num_warps=_NUM_WARPS),
        )
    ]
    if split:
        launches.append(
            Launch(
                _decode_reduce_kernel,
                (batch, num_heads),
                (
                    out,
                    part_out,
                    part_max,
                    part_sum,
                    seq_lens,
                    out.stride(0),
                    out.stride(1),
                    num_heads,
                    head_dim,
                    max_parts,
                ),
                dict(
                    BLOCK_D=block_d,
                    BLOCK_P=min(32, next_pow2(max_parts)),
                    PARTITION_SIZE=partition_size,
                ),
            )
        )
    return launches


def gather_context(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [seq_len, Hkv, D] of one sequence, read through its block table row."""
    block_size = k_cache.shape[1]
    pos = torch.arange(seq_len, device=k_cache.device)
    blocks = block_table[pos // block_size].long()
    return k_cache[blocks, pos % block_size], v_cache[blocks, pos % block_size]


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `paged_decode_attention`: per sequence, gather, softmax in fp32."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = q.shape[1] // k_cache.shape[2]
    for b, seq_len in enumerate(seq_lens.tolist()):
        k, v = gather_context(k_cache, v_cache, block_tables[b], seq_len)
        k = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hs,shd->hd", probs, v).to(out.dtype)
    return out
