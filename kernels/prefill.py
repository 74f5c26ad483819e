"""`paged_prefill_attention`: variable-length causal attention of new tokens over paged KV.

Covers chunked prefill and prefix-cache hits in one kernel: the new tokens' K/V are already in
the pool, so every key (cached prefix and new tokens alike) is read through the block table.
Sequence b owns query rows `query_start_loc[b]:query_start_loc[b+1]` (q_len of them); its i-th
new token sits at absolute position `seq_lens[b] - q_len + i` and sees keys at positions <= that.

One program per (sequence, tile of BLOCK_Q new tokens, KV head). GQA rows are packed: the tile's
BLOCK_Q tokens times the KV head's query group (padded to a power of two) form the BLOCK_M rows
of one `tl.dot`, so every K/V tile is loaded once per group rather than once per query head.
Online softmax in fp32 (log2 domain), keys walked in tiles of BLOCK_N up to the tile's last
causal position.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import Launch, check_attention, check_tensor, dot_precision, next_pow2
from .decode import gather_context

_BLOCK_M = 64  # packed (token, head) rows per program
_BLOCK_N = 32  # keys per tile
_NUM_WARPS = 8  # 4 spills registers on sm_90 at head_dim 128 in fp32 (ptxas -v)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    scale_log2,
    head_dim,
    block_size,
    QUERY_GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    first_tok = q_tile * BLOCK_Q
    if first_tok >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context_len = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    r = tl.arange(0, BLOCK_M)
    tok = first_tok + r // G_PAD
    g = r % G_PAD
    row_mask = (tok < q_len) & (g < QUERY_GROUP)
    heads = kvh * QUERY_GROUP + g
    q_pos = context_len + tok  # absolute position of each row's token
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    io_mask = row_mask[:, None] & d_mask[None, :]
    q_rows = (q_start + tok).to(tl.int64)
    q_offs = q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=io_mask, other=0.0).to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys past the tile's last token are masked for every row; key 0 is visible to every row
    # (padding rows included), so no row's max stays -inf.
    kv_end = context_len + tl.minimum(q_len, first_tok + BLOCK_Q)
    n = tl.arange(0, BLOCK_N)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for tile in range(0, kv_end, BLOCK_N):
        pos = tile + n
        valid = pos < kv_end
        blk = tl.load(bt_row + pos // block_size, mask=valid, other=0).to(tl.int64)
        kv_rows = blk * stride_cb + (pos % block_size) * stride_cs + kvh * stride_ch
        kv_offs = kv_rows[:, None] + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new

    acc = acc / row_sum[:, None]
    o_offs = q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    check_attention(q, k_cache, v_cache, block_tables, seq_lens, out)
    check_tensor(
        "query_start_loc", query_start_loc, 1, dtypes=(torch.int32, torch.int64), device=q.device
    )
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries, expected {batch + 1} "
            f"(batch {batch} from seq_lens)"
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens of B sequences over cached prefix + themselves.

    q [T, Hq, D] (new tokens, concatenated); query_start_loc [B+1] int32 (cumulative offsets
    into q, query_start_loc[0] == 0); seq_lens [B] int32 = cached context + new tokens, whose
    K/V are already written to the pool; block_tables [B, max_blocks] int32. Returns `out`
    (allocated if None) [T, Hq, D] in q's dtype; rows outside every sequence's range are left
    untouched. `max_query_len` (the largest q_len) sizes the grid; when None it is read from
    query_start_loc, which syncs with the device once.
    """
    _check(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    batch = seq_lens.shape[0]
    if batch == 0 or q.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    if max_query_len <= 0:
        return out
    plan_prefill(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out, max_query_len
    ).run(q.device)
    return out


def plan_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_query_len: int,
) -> Launch:
    """The launch of one (checked) prefill call with a positive `max_query_len`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    g_pad = next_pow2(group)
    block_q = max(1, _BLOCK_M // g_pad)
    return Launch(
        _prefill_kernel,
        (seq_lens.shape[0], triton.cdiv(max_query_len, block_q), num_kv_heads),
        (
            q,
            k_cache,
            v_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            out,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            float(scale) * math.log2(math.e),
            head_dim,
            block_size,
        ),
        dict(
            QUERY_GROUP=group,
            G_PAD=g_pad,
            BLOCK_Q=block_q,
            BLOCK_D=next_pow2(head_dim),
            BLOCK_N=_BLOCK_N,
            DOT_PRECISION=dot_precision(q.dtype),
        ),
        dict(num_warps=_NUM_WARPS),
    )


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `paged_prefill_attention`: per sequence, gather, causal fp32 softmax."""
    _check(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = q.shape[1] // k_cache.shape[2]
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k, v = gather_context(k_cache, v_cache, block_tables[b], seq_len)
        k = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores = torch.einsum("thd,shd->hts", q[lo:hi].float(), k) * scale
        scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[lo:hi] = torch.einsum("hts,shd->thd", probs, v).to(out.dtype)
    return out
