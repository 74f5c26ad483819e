"""paged_decode_attention against its torch reference and a dense float64 attention."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from splitserve.kernels import available, paged_decode_attention, paged_decode_attention_ref

pytestmark = pytest.mark.skipif(not available(), reason="needs CUDA or TRITON_INTERPRET=1")

NUM_KV_HEADS = 2


def _run_case(paged, seq_lens, *, head_dim, group, block_size, dtype, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    batch = paged.build(
        seq_lens,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        gen=gen,
    )
    num_heads = NUM_KV_HEADS * group
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype).to(paged.device)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, scale, out, **kwargs
    )
    assert got is out
    assert torch.isfinite(out).all(), "unwritten or NaN-contaminated output elements"
    ref = paged_decode_attention_ref(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, scale
    )
    dense = torch.stack(
        [
            paged.dense(q[b : b + 1], batch.keys[b], batch.values[b], scale)[0]
            for b in range(len(seq_lens))
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
def test_split_k_matches_references(paged, head_dim, group, block_size, dtype):
    # A small partition forces split-K on short contexts: smaller than a block for
    # block_size 32, larger than one for 16. Lengths avoid multiples of the block size.
    partition = 16 if block_size == 32 else 32
    seed = zlib.crc32(f"decode-{head_dim}-{group}-{block_size}-{dtype}".encode())
    rng = torch.Generator().manual_seed(seed)
    seq_lens = [
        1,
        block_size + 3,
        int(torch.randint(3 * partition + 1, 5 * partition, (1,), generator=rng)),
        int(torch.randint(2, 3 * block_size, (1,), generator=rng)) | 1,
    ]
    _run_case(
        paged,
        seq_lens,
        head_dim=head_dim,
        group=group,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
        partition_size=partition,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_partition_path_writes_output_directly(paged, dtype):
    # Every context fits in one 512-token partition: no reduce pass runs.
    _run_case(paged, [5, 77, 130], head_dim=64, group=3, block_size=16, dtype=dtype, seed=11)


def test_default_partition_long_context(paged):
    # Over 512 tokens with the default partition size: the reduce merges 2 and 3 partitions.
    _run_case(
        paged, [1100, 513, 9], head_dim=64, group=8, block_size=32, dtype=torch.float32, seed=5
    )


@pytest.mark.parametrize(
    ("head_dim", "group", "block_size", "seq_lens"),
    [
        (80, 2, 1, [9, 40]),  # head_dim not a power of two, one token per block
        (96, 5, 8, [3, 61, 17]),
        (32, 4, 64, [130, 1]),
        (256, 1, 128, [200]),
    ],
)
def test_other_shapes(paged, head_dim, group, block_size, seq_lens):
    _run_case(
        paged,
        seq_lens,
        head_dim=head_dim,
        group=group,
        block_size=block_size,
        dtype=torch.float32,
        seed=head_dim,
        partition_size=32,
    )


def test_int64_index_tensors(paged):
    gen = torch.Generator().manual_seed(21)
    batch = paged.build(
        [45, 7], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    q = torch.randn(2, 4, 64, generator=gen).to(paged.device)
    tables, lens = batch.block_tables.long(), batch.seq_lens.long()
    out = paged_decode_attention(
        q, batch.k_cache, batch.v_cache, tables, lens, 0.2, partition_size=16
    )
    ref = paged_decode_attention_ref(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.2
    )
    assert paged.rel_err(out, ref) < 1e-4


def test_max_seq_len_sizes_the_grid(paged):
    # A wide block table but short contexts: with max_seq_len the single-partition path runs.
    from splitserve.kernels.decode import plan_decode

    gen = torch.Generator().manual_seed(17)
    batch = paged.build(
        [100, 33], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    tables = torch.cat([batch.block_tables, batch.block_tables, batch.block_tables], dim=1)
    q = torch.randn(2, 3, 64, generator=gen).to(paged.device)
    kv = (batch.k_cache, batch.v_cache)
    plans = [
        plan_decode(q, *kv, tables, batch.seq_lens, 0.2, torch.empty_like(q), 64, n)
        for n in (100, tables.shape[1] * 16)
    ]
    assert [len(p) for p in plans] == [2, 2]
    assert plans[0][0].grid == (2, 1, 2) and plans[1][0].grid[2] > 2
    single = plan_decode(q, *kv, tables, batch.seq_lens, 0.2, torch.empty_like(q), 128, 100)
    assert len(single) == 1 and single[0].constexprs["SPLIT"] is False
    ref = paged_decode_attention_ref(q, *kv, tables, batch.seq_lens, 0.2)
    for max_seq_len, partition in ((100, 64), (100, 128), (None, 64)):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(
            q,
            *kv,
            tables,
            batch.seq_lens,
            0.2,
            out,
            partition_size=partition,
            max_seq_len=max_seq_len,
        )
        assert paged.rel_err(out, ref) < 1e-4
    with pytest.raises(ValueError, match="max_seq_len"):
        paged_decode_attention(q, *kv, tables, batch.seq_lens, 0.2, max_seq_len=0)


def test_float16(paged):
    _run_case(paged, [40, 3], head_dim=64, group=3, block_size=16, dtype=torch.float16, seed=7)


def test_strided_query_and_output_views(paged):
    # q and out as head-sliced views of wider tensors (as when q is split off a fused qkv).
    gen = torch.Generator().manual_seed(3)
    batch = paged.build(
        [29, 70], num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    qkv = torch.randn(2, 6, 64, generator=gen).to(paged.device)
    q = qkv[:, :4]
    wide_out = torch.full((2, 8, 64), float("nan"), device=paged.device)
    out = wide_out[:, 2:6]
    paged_decode_attention(
        q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        0.125,
        out,
        partition_size=32,
    )
    ref = paged_decode_attention_ref(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, 0.125
    )
    assert paged.rel_err(out, ref) < 1e-4
    assert torch.isnan(wide_out[:, :2]).all() and torch.isnan(wide_out[:, 6:]).all()


def test_rejects_bad_arguments(paged):
    gen = torch.Generator().manual_seed(1)
    batch = paged.build(
        [10], num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32, gen=gen
    )
    kc, vc, bt, sl = batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens
    q = torch.randn(1, 6, 64, device=paged.device)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(q[:, :5], kc, vc, bt, sl, 1.0)
    with pytest.raises(TypeError, match="must match"):
        paged_decode_attention(q.bfloat16(), kc, vc, bt, sl, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        paged_decode_attention(q, kc, vc, bt.float(), sl, 1.0)
    with pytest.raises(ValueError, match="stride 1"):
        paged_decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, bt, sl, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 6, 32, device=paged.device), kc, vc, bt, sl, 1.0)
    with pytest.raises(ValueError, match="out shape"):
        paged_decode_attention(q, kc, vc, bt, sl, 1.0, torch.empty(1, 6, 32, device=paged.device))
    with pytest.raises(ValueError, match="head_dim must be in"):
        small = torch.zeros(4, 16, 2, 8, device=paged.device)
        paged_decode_attention(torch.zeros(1, 2, 8, device=paged.device), small, small, bt, sl, 1.0)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention(q, kc, vc, bt, sl, 1.0, partition_size=48)
    with pytest.raises(ValueError, match="batch"):
        paged_decode_attention(q, kc, vc, bt, torch.cat([sl, sl]), 1.0)
