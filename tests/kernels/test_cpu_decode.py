"""The C++ CPU paged decode kernel (every implementation this CPU runs) against dense float64
attention, over a NaN-poisoned pool: reading a wrong block or slot turns the output NaN."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ CPU kernels could not be built")

IMPLS = {0: "scalar", 1: "avx512", 2: "avx512bf16"}


def _impls():
    return [pytest.param(i, id=IMPLS[i]) for i in IMPLS]


SHAPES = [(3, 3, 64, 16), (2, 4, 128, 32), (1, 8, 32, 16), (4, 1, 64, 8), (2, 7, 48, 16)]


def _cases():
    """(impl, dtype, hkv, group, head_dim, block_size); the BF16 path takes bf16 with head_dim
    32/64/128 only (other inputs go to the other paths)."""
    for impl in IMPLS:
        for dtype in (torch.float32, torch.bfloat16):
            for hkv, group, d, bs in SHAPES:
                if impl == 2 and (dtype != torch.bfloat16 or d not in (32, 64, 128)):
                    continue
                name = f"{IMPLS[impl]}-{str(dtype)[6:]}-h{hkv}x{group}-d{d}-b{bs}"
                yield pytest.param(impl, dtype, hkv, group, d, bs, id=name)


def _check(paged, seq_lens, *, hkv, group, head_dim, block_size, dtype, impl, seed=0):
    if impl not in cpu.available_impls():
        pytest.skip(f"{IMPLS[impl]} is not supported by this CPU")
    gen = torch.Generator().manual_seed(seed)
    batch = paged.build(
        seq_lens,
        num_kv_heads=hkv,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        gen=gen,
    )
    k_cache, v_cache = batch.k_cache.cpu(), batch.v_cache.cpu()
    tables, lens = batch.block_tables.cpu(), batch.seq_lens.cpu()
    hq = hkv * group
    # queries as a strided view, like the model's split of its fused q/k projection
    qk = torch.randn(len(seq_lens), hq + hkv, head_dim, generator=gen).to(dtype)
    q = qk[:, :hq]
    scale = 1.0 / math.sqrt(head_dim)
    out = cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, impl)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    dense = torch.stack(
        [
            paged.dense(q[b : b + 1], batch.keys[b], batch.values[b], scale)[0]
            for b in range(len(seq_lens))
        ]
    )
    assert paged.rel_err(out, dense) < paged.tol[dtype]
    return out


@pytest.mark.parametrize(
    ("impl", "dtype", "hkv", "group", "head_dim", "block_size"), list(_cases())
)
def test_matches_dense_attention(paged, impl, dtype, hkv, group, head_dim, block_size):
    # one-token, block-multiple and ragged lengths; few sequences, so long ones are split
    seq_lens = [1, 17, block_size * 3, 700, 45]
    _check(
        paged,
        seq_lens,
        hkv=hkv,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        impl=impl,
    )


@pytest.mark.parametrize("impl", _impls())
def test_large_batch_without_split(paged, impl):
    # enough sequences that no sequence is split: each item covers a whole sequence
    seq_lens = [(37 * i) % 300 + 1 for i in range(40)]
    _check(
        paged,
        seq_lens,
        hkv=3,
        group=3,
        head_dim=64,
        block_size=16,
        dtype=torch.bfloat16,
        impl=impl,
    )


def test_implementations_agree_closely(paged):
    """All paths compute fp32 scores and softmax; bf16 outputs differ by output rounding (and,
    on the BF16 path, probabilities rounded to bf16 before P @ V) only."""
    impls = cpu.available_impls()
    outs = [
        _check(
            paged,
            [5, 300, 1000],
            hkv=3,
            group=3,
            head_dim=64,
            block_size=16,
            dtype=torch.bfloat16,
            impl=i,
        ).float()
        for i in impls
    ]
    for other in outs[1:]:
        assert (other - outs[0]).abs().max() < 2e-2


@pytest.mark.parametrize("impl", _impls())
def test_nan_in_keys_shows_in_the_output(impl):
    """A numerical blow-up in K must not be hidden by one implementation and shown by others."""
    if impl not in cpu.available_impls():
        pytest.skip(f"{IMPLS[impl]} is not supported by this CPU")
    kv = torch.randn(4, 1, 2, 16, 1, 64)
    kv[1, 0, 0, 3, 0, 5] = float("nan")  # one element of key 19 of the sequence below
    dtype = torch.bfloat16 if impl == 2 else torch.float32
    kv = kv.to(dtype)
    q = torch.randn(1, 2, 64).to(dtype)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    out = cpu.paged_decode_attention(
        q, kv[:, 0, 0], kv[:, 0, 1], tables, torch.tensor([30], dtype=torch.int32), 0.125, impl
    )
    assert torch.isnan(out).all()


def test_bad_arguments_raise_clear_errors():
    kv = torch.zeros(4, 2, 2, 16, 2, 64)
    k, v = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.zeros(2, 4, 64)
    tables = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 40], dtype=torch.int32)  # 40 > 2 blocks of 16
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        cpu.paged_decode_attention(q, k, v, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="int32"):
        cpu.paged_decode_attention(q, k, v, tables.long(), lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        cpu.paged_decode_attention(torch.zeros(2, 3, 64), k, v, tables, lens.clamp(max=3), 0.1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu.paged_decode_attention(q.bfloat16(), k, v, tables, lens.clamp(max=3), 0.125)
    bad_ids = torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)  # the pool has blocks 0-3
    with pytest.raises(RuntimeError, match=r"block_tables\[1\]\[1\] = 4 is not a block"):
        cpu.paged_decode_attention(q, k, v, bad_ids, torch.tensor([3, 20], dtype=torch.int32), 1)
    cpu.paged_decode_attention(q, k, v, bad_ids, torch.tensor([3, 16], dtype=torch.int32), 1)
    empty = cpu.paged_decode_attention(q[:0], k, v, tables[:0], lens[:0], 0.125)
    assert empty.shape == (0, 4, 64)
