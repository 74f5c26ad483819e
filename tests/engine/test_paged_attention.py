"""The torch paged-attention backend equals dense causal attention (fp32, float64 reference)."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.services.engine.attention import AttentionMetadata, get_attention_backend


def build_batch(specs, block_size, hq, hkv, d, num_layers=2, layer=1, seed=0):
    """specs: [(context_len, q_len)]; decodes (q_len == 1) must come first.

    Returns the kv pool, metadata, per-sequence full K/V/Q and the new-token tensors.
    """
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-(c + q) // block_size) for c, q in specs) + 7
    perm = torch.randperm(total_blocks, generator=g).tolist()  # scattered block ids
    kv = torch.randn(total_blocks, num_layers, 2, block_size, hkv, d, generator=g)
    tables, seqs, slots, q_new, k_new, v_new = [], [], [], [], [], []
    for ctx, q_len in specs:
        n = ctx + q_len
        nb = -(-n // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        k = torch.randn(n, hkv, d, generator=g)
        v = torch.randn(n, hkv, d, generator=g)
        q = torch.randn(q_len, hq, d, generator=g)
        for pos in range(ctx):  # the cached context is already in the pool
            kv[blocks[pos // block_size], layer, 0, pos % block_size] = k[pos]
            kv[blocks[pos // block_size], layer, 1, pos % block_size] = v[pos]
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx, n)]
        q_new.append(q)
        k_new.append(k[ctx:])
        v_new.append(v[ctx:])
        seqs.append((k, v, q, ctx))
    max_blocks = max(len(t) for t in tables)
    table = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    nd = sum(1 for _, q in specs if q == 1)
    assert all(q == 1 for _, q in specs[:nd])
    q_lens = [q for _, q in specs[nd:]]
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in specs], dtype=torch.int32)
    meta = AttentionMetadata(
        block_size=block_size,
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode_tokens=nd,
        decode_seq_lens=seq_lens[:nd],
        decode_block_tables=table[:nd],
        num_prefill_tokens=sum(q_lens),
        prefill_query_start_loc=qsl,
        prefill_seq_lens=seq_lens[nd:],
        prefill_block_tables=table[nd:],
        decode_max_seq_len=int(seq_lens[:nd].max()) if nd else 0,
        prefill_max_seq_len=int(seq_lens[nd:].max()) if q_lens else 0,
        prefill_max_query_len=max(q_lens, default=0),
        prefill_has_context=any(c > 0 for c, _ in specs[nd:]),
    )
    return kv, meta, seqs, torch.cat(q_new), torch.cat(k_new), torch.cat(v_new)


def dense_reference(seqs, hq, hkv):
    outs = []
    for k, v, q, ctx in seqs:
        k64, v64, q64 = k.double(), v.double(), q.double()
        rep = hq // hkv
        k64 = k64.repeat_interleave(rep, dim=1)  # [n, hq, d]
        v64 = v64.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q64, k64) / math.sqrt(q.shape[-1])
        n = k.shape[0]
        qpos = torch.arange(ctx, n)[:, None]
        mask = torch.arange(n)[None, :] <= qpos
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64))
    return torch.cat(outs)


CASES = [
    # (specs, block_size, hq, hkv, d)
    ([(0, 37)], 16, 4, 4, 64),  # one fresh prompt, not a block multiple
    ([(20, 1), (47, 1), (3, 1)], 16, 9, 3, 64),  # decodes only, GQA 3
    ([(15, 1), (0, 5), (33, 17), (16, 16)], 16, 8, 1, 32),  # mixed, MQA, context + chunk
    ([(100, 1), (0, 64), (61, 3)], 32, 6, 2, 128),  # block 32, head_dim 128
    ([(0, 1)], 8, 2, 2, 16),  # a one-token prompt goes the decode way
]


@pytest.mark.parametrize(("specs", "block_size", "hq", "hkv", "d"), CASES)
def test_torch_backend_matches_dense(specs, block_size, hq, hkv, d):
    layer = 1
    kv, meta, seqs, q, k, v = build_batch(specs, block_size, hq, hkv, d, layer=layer)
    step = get_attention_backend("torch").prepare(kv, meta)
    out = step(layer, q, k, v)
    ref = dense_reference(seqs, hq, hkv)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the new K/V landed in their slots
    bs = block_size
    for slot, krow in zip(meta.slot_mapping.tolist(), k, strict=True):
        assert torch.equal(kv[slot // bs, layer, 0, slot % bs], krow)
