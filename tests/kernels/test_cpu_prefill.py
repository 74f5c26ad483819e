"""The C++ CPU paged prefill kernel (bf16, AVX512-BF16) against dense float64 causal attention:
fresh prompts, chunks with context, one-token queries, GQA ratios, head dims, block sizes; the
pool is NaN-poisoned, so reading a wrong block or slot turns the output NaN."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.kernels import cpu

pytestmark = pytest.mark.skipif(
    not cpu.available() or 2 not in cpu.available_impls(),
    reason="needs the C++ CPU kernels and a CPU with AVX512-BF16",
)

CASES = [
    # (specs [(context, q_len)], hkv, group, head_dim, block_size)
    ([(0, 37), (5, 20), (0, 1), (100, 3)], 3, 3, 64, 16),
    ([(0, 300), (17, 250)], 1, 8, 128, 32),
    ([(0, 64), (33, 70), (16, 16)], 4, 1, 32, 16),
    ([(0, 15), (0, 16), (0, 17), (31, 33)], 2, 4, 64, 8),
    ([(500, 12)], 2, 2, 64, 16),  # a short chunk after a long context
]


@pytest.mark.parametrize(("specs", "hkv", "group", "head_dim", "block_size"), CASES)
def test_matches_dense_causal_attention(paged, specs, hkv, group, head_dim, block_size):
    gen = torch.Generator().manual_seed(len(specs) * head_dim + block_size)
    seq_lens = [c + q for c, q in specs]
    batch = paged.build(
        seq_lens,
        num_kv_heads=hkv,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.bfloat16,
        gen=gen,
    )
    hq = hkv * group
    q_lens = torch.tensor([q for _, q in specs])
    qsl = torch.zeros(len(specs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    # queries as a strided view, like the model's split of its fused q/k projection
    qk = torch.randn(int(qsl[-1]), hq + hkv, head_dim, generator=gen).bfloat16()
    q = qk[:, :hq]
    scale = 1.0 / math.sqrt(head_dim)
    out = cpu.paged_prefill_attention(
        q,
        batch.k_cache.cpu(),
        batch.v_cache.cpu(),
        batch.block_tables.cpu(),
        qsl,
        batch.seq_lens.cpu(),
        scale,
    )
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    dense = torch.cat(
        [
            paged.dense(q[qsl[b] : qsl[b + 1]], batch.keys[b], batch.values[b], scale)
            for b in range(len(specs))
        ]
    )
    assert paged.rel_err(out, dense) < paged.tol[torch.bfloat16]


def test_bad_arguments_raise_clear_errors():
    kv = torch.zeros(4, 2, 2, 16, 2, 64, dtype=torch.bfloat16)
    k, v = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.zeros(5, 4, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    qsl = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block table holds 32"):
        cpu.paged_prefill_attention(q, k, v, tables, qsl, torch.tensor([40], dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match="has 5 queries and seq_len 3"):
        cpu.paged_prefill_attention(q, k, v, tables, qsl, torch.tensor([3], dtype=torch.int32), 1)
    with pytest.raises(RuntimeError, match="needs bf16"):
        cpu.paged_prefill_attention(
            q.float(), k.float(), v.float(), tables, qsl, torch.tensor([5], dtype=torch.int32), 1
        )
    with pytest.raises(RuntimeError, match=r"block_tables\[0\]\[0\] = -1 is not a block"):
        cpu.paged_prefill_attention(
            q, k, v, torch.tensor([[-1, 0]], dtype=torch.int32), qsl,
            torch.tensor([5], dtype=torch.int32), 1,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="from 0 to the number of query rows"):
        cpu.paged_prefill_attention(
            q, k, v, tables, torch.tensor([0, 4], dtype=torch.int32),
            torch.tensor([5], dtype=torch.int32), 1,
        )  # fmt: skip
