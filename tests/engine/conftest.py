"""Shared engine fixtures: the default model (fp32, for HF parity) and tiny random models."""

from __future__ import annotations

import math
import types

import pytest
import torch

from splitserve.engine.attention import AttentionMetadata


@pytest.fixture(scope="session")
def default_llm():
    """SmolLM2 in float32 with a modest pool: shared by the tests that need the real model."""
    from splitserve import LLM

    return LLM(dtype="float32", num_kv_blocks=512, max_num_seqs=64)


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy():
    return _hf_greedy


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers generate(), greedy, one prompt at a time: the correctness oracle."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=2,
        )
    return out[0, ids.shape[1] :].tolist()


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


@pytest.fixture(scope="session")
def attn_helpers():
    """Builders for paged-attention batches and their dense float64 reference."""
    return types.SimpleNamespace(build_batch=build_batch, dense_reference=dense_reference)
