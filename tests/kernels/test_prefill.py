"""paged_prefill_attention against its torch reference and a dense float64 causal attention."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from splitserve.kernels import available, paged_prefill_attention, paged_prefill_attention_ref

pytestmark = pytest.mark.skipif(not available(), reason="needs CUDA or TRITON_INTERPRET=1")

NUM_KV_HEADS = 2


def _run_case(paged, layout, *, head_dim, group, block_size, dtype, seed, num_kv_heads=2):
    """layout: (cached context, new tokens) per sequence."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + new for ctx, new in layout]
    q_lens = [new for _, new in layout]
    batch = paged.build(
        seq_lens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        gen=gen,
    )
    num_heads = num_kv_heads * group
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype).to(paged.device)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32, device=paged.device)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, qsl, batch.seq_lens, scale)
    got = paged_prefill_attention(*args, out)
    assert got is out
    assert torch.isfinite(out).all(), "unwritten or NaN-contaminated output elements"
    ref = paged_prefill_attention_ref(*args)
    dense = torch.cat(
        [
            paged.dense(q[starts[b] : starts[b + 1]], batch.keys[b], batch.values[b], scale)
            for b in range(len(layout))
        ]
    )
    tol = paged.tol[dtype]
    assert paged.rel_err(out, ref) < tol
    assert paged.rel_err(out, dense) < tol
    assert paged.rel_err(ref, dense) < tol
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_matches_references(paged, head_dim, group, block_size, dtype):
    seed = zlib.crc32(f"prefill-{head_dim}-{group}-{block_size}-{dtype}".encode())
    rng = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=rng))

    layout = [
        (0, draw(block_size + 1, 3 * block_size) | 1),  # fresh prompt, no cache hit
        (2 * block_size, draw(2, block_size)),  # prefix hit on whole blocks, short suffix
        (draw(1, 2 * block_size) | 1, 1),  # a decode step riding in the batch
        (draw(block_size, 3 * block_size) | 1, draw(33, 60)),  # chunked prefill, unaligned
    ]
    _run_case(
        paged, layout, head_dim=head_dim, group=group, block_size=block_size, dtype=dtype, seed=seed
    )


@pytest.mark.parametrize(
    ("head_dim", "group", "block_size", "layout"),
    [
        (80, 2, 1, [(3, 9), (0, 40)]),  # head_dim not a power of two, one token per block
        (96, 5, 8, [(50, 11), (0, 1), (7, 30)]),
        (32, 4, 64, [(100, 70)]),
        (256, 1, 128, [(130, 20), (0, 5)]),
    ],
)
def test_other_shapes(paged, head_dim, group, block_size, layout):
    _run_case(
        paged,
        layout,
        head_dim=head_dim,
        group=group,
        block_size=block_size,
        dtype=torch.float32,
        seed=head_dim,
    )


def test_int64_index_tensors(paged):
    gen = torch.Generator().manual_seed(22)
    batch = paged.build(
        [45, 7], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    q = torch.randn(12, 4, 64, generator=gen).to(paged.device)
    qsl = torch.tensor([0, 5, 12], device=paged.device)
    kv = (batch.k_cache, batch.v_cache)
    out = paged_prefill_attention(
        q, *kv, batch.block_tables.long(), qsl, batch.seq_lens.long(), 0.2
    )
    ref = paged_prefill_attention_ref(q, *kv, batch.block_tables, qsl.int(), batch.seq_lens, 0.2)
    assert paged.rel_err(out, ref) < 1e-4


def test_sequence_without_new_tokens_is_skipped(paged):
    _run_case(
        paged,
        [(5, 7), (33, 0), (0, 20)],
        head_dim=64,
        group=3,
        block_size=16,
        dtype=torch.float32,
        seed=9,
    )


def test_float16_and_single_kv_head(paged):
    _run_case(
        paged,
        [(17, 30), (0, 3)],
        head_dim=64,
        group=4,
        block_size=32,
        dtype=torch.float16,
        seed=4,
        num_kv_heads=1,
    )


def test_strided_query_and_output_views(paged):
    # q split off a fused qkv output and out a head slice of a wider buffer (offset storage).
    gen = torch.Generator().manual_seed(6)
    batch = paged.build(
        [30, 12], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    qkv = torch.randn(14, 10, 64, generator=gen).to(paged.device)
    q = qkv[:, 2:8]
    wide = torch.full((14, 9, 64), float("nan"), device=paged.device)
    out = wide[:, 3:9]
    qsl = torch.tensor([0, 9, 14], dtype=torch.int32, device=paged.device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, qsl, batch.seq_lens, 0.125)
    paged_prefill_attention(*args, out)
    assert paged.rel_err(out, paged_prefill_attention_ref(*args)) < 1e-4
    assert torch.isnan(wide[:, :3]).all()


def test_rows_outside_query_ranges_are_untouched(paged):
    # query_start_loc need not cover all of q: rows past its end are left as they were.
    gen = torch.Generator().manual_seed(2)
    batch = paged.build(
        [10, 20], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    q = torch.randn(16, 1, 64, generator=gen).to(paged.device)
    qsl = torch.tensor([0, 4, 12], dtype=torch.int32, device=paged.device)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        qsl,
        batch.seq_lens,
        0.1,
        out,
        max_query_len=8,
    )
    assert torch.isfinite(out[:12]).all()
    assert torch.isnan(out[12:]).all()


def test_rejects_bad_arguments(paged):
    gen = torch.Generator().manual_seed(1)
    batch = paged.build(
        [10], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    kc, vc, bt, sl = batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens
    q = torch.randn(4, 6, 64, device=paged.device)
    qsl = torch.tensor([0, 4], dtype=torch.int32, device=paged.device)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(q, kc, vc, bt, qsl[:1], sl, 1.0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_prefill_attention(q[:, :3], kc, vc, bt, qsl, sl, 1.0)
    with pytest.raises(ValueError, match="3 dims"):
        paged_prefill_attention(q[0], kc, vc, bt, qsl, sl, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        paged_prefill_attention(q, kc, vc, bt, qsl.float(), sl, 1.0)
