"""Shared builders for the kernel tests: a poisoned paged pool and a dense float64 oracle.

Without CUDA the kernels run under Triton's interpreter. The wrappers read TRITON_INTERPRET at
launch time (not at decoration time), so setting it here works even if another test module
imported splitserve.kernels first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 3
LAYER = 1  # a middle layer: its K/V views are strided on both sides


@dataclass
class PagedBatch:
    """Sequences scattered through a NaN-poisoned block pool, and their dense K/V."""

    kv_cache: torch.Tensor  # [num_blocks, NUM_LAYERS, 2, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D]
    values: list[torch.Tensor]

    @property
    def k_cache(self) -> torch.Tensor:
        return self.kv_cache[:, LAYER, 0]

    @property
    def v_cache(self) -> torch.Tensor:
        return self.kv_cache[:, LAYER, 1]


def build_paged_batch(
    seq_lens: list[int],
    *,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    spare_blocks: int = 5,
) -> PagedBatch:
    """Random K/V per sequence written into randomly chosen (non-contiguous) blocks of a pool
    whose every other byte is NaN: a kernel reading a wrong block, a slot past a sequence's end,
    or another layer's K/V produces NaN. Block-table entries past each sequence point at
    poisoned blocks for the same reason."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq) + 2
    kv = torch.full(
        (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype
    )
    perm = torch.randperm(num_blocks, generator=gen)
    used, spare = perm[: sum(blocks_per_seq)], perm[sum(blocks_per_seq) :]
    tables = spare[torch.randint(len(spare), (len(seq_lens), max_blocks), generator=gen)]
    keys, values = [], []
    cursor = 0
    for b, n in enumerate(seq_lens):
        own = used[cursor : cursor + blocks_per_seq[b]]
        cursor += blocks_per_seq[b]
        tables[b, : len(own)] = own
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        blk = own[pos // block_size]
        kv[blk, LAYER, 0, pos % block_size] = k
        kv[blk, LAYER, 1, pos % block_size] = v
        keys.append(k)
        values.append(v)
    return PagedBatch(
        kv_cache=kv.to(DEVICE),
        block_tables=tables.to(torch.int32).to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        keys=keys,
        values=values,
    )


def dense_attention_f64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention in float64 for one sequence, built from its dense K/V with no paging.

    q [q_len, Hq, D] are the last q_len positions of k/v [S, Hkv, D]. Returns [q_len, Hq, D]."""
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_len, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)
    future = torch.arange(seq_len)[None, :] > q_pos[:, None]
    scores = scores.masked_fill(future[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (NaN anywhere gives NaN)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((a - e).abs().max() / e.abs().max()).item()


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def paged() -> SimpleNamespace:
    """The builders above, as a fixture (test modules can not import conftest)."""
    return SimpleNamespace(
        build=build_paged_batch,
        dense=dense_attention_f64,
        rel_err=rel_err,
        tol=TOLERANCE,
        device=DEVICE,
        layer=LAYER,
    )
