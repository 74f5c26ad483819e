"""The C++ CPU attention kernels against the pure-torch backend, in one run (SmolLM2 shapes, bf16).

PYTHONSAFEPATH=1 .venv/bin/python -P bench/cpu_attention.py [--reps 5]

Decode: 64 sequences with contexts of 100-640 tokens, 30 layers' worth of calls (one engine
step): the `cpu` backend's kernel vs the `torch` backend (length buckets, block gather, two
batched matmuls per bucket). Prefill: 8 fresh prompts of 32-512 tokens, one call per layer vs
one SDPA call per prompt. Both through the backends' `prepare(...)(layer, q, k, v)`, so the
per-step setup and the K/V cache writes are included. Prints times and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitserve.engine.attention import AttentionMetadata, get_attention_backend

LAYERS, HQ, HKV, D, BS = 30, 9, 3, 64, 16


def _pool_and_tables(seq_lens: list[int], gen: torch.Generator):
    nbs = [-(-n // BS) for n in seq_lens]
    num_blocks = sum(nbs) + 8
    kv = torch.randn(num_blocks, LAYERS, 2, BS, HKV, D, generator=gen).bfloat16()
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(nbs), dtype=torch.int32)
    used = 0
    for b, n in enumerate(nbs):
        tables[b, :n] = perm[used : used + n]
        used += n
    return kv, tables


def decode_meta(seq_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    rows = torch.arange(len(seq_lens))
    slots = tables[rows, (lens - 1) // BS].long() * BS + (lens - 1) % BS
    return AttentionMetadata(
        block_size=BS,
        slot_mapping=slots,
        num_decode_tokens=len(seq_lens),
        decode_seq_lens=lens,
        decode_block_tables=tables,
        num_prefill_tokens=0,
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
        prefill_seq_lens=torch.zeros(0, dtype=torch.int32),
        prefill_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int32),
        decode_max_seq_len=max(seq_lens),
        prefill_max_seq_len=0,
        prefill_max_query_len=0,
        prefill_has_context=False,
    )


def prefill_meta(seq_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(lens, 0)
    seq = torch.repeat_interleave(torch.arange(len(seq_lens)), lens.long())
    pos = torch.arange(int(qsl[-1])) - qsl[:-1].long()[seq]
    slots = tables[seq, pos // BS].long() * BS + pos % BS
    return AttentionMetadata(
        block_size=BS,
        slot_mapping=slots,
        num_decode_tokens=0,
        decode_seq_lens=torch.zeros(0, dtype=torch.int32),
        decode_block_tables=torch.zeros(0, tables.shape[1], dtype=torch.int32),
        num_prefill_tokens=int(qsl[-1]),
        prefill_query_start_loc=qsl,
        prefill_seq_lens=lens,
        prefill_block_tables=tables,
        decode_max_seq_len=0,
        prefill_max_seq_len=max(seq_lens),
        prefill_max_query_len=max(seq_lens),
        prefill_has_context=False,
    )


def time_step(backend: str, kv, meta, q, k, v, reps: int) -> tuple[float, torch.Tensor]:
    """Median ms for one step's attention over all layers (prepare included)."""
    attn = get_attention_backend(backend)
    times, out = [], None
    with torch.inference_mode():
        for _ in range(reps + 1):
            start = time.perf_counter()
            step = attn.prepare(kv, meta)
            for layer in range(LAYERS):
                out = step(layer, q, k, v)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:]), out


def compare(name: str, kv, meta, num_tokens: int, gen, reps: int) -> None:
    q = torch.randn(num_tokens, HQ + HKV, D, generator=gen).bfloat16()[:, :HQ]  # strided, as in
    k = torch.randn(num_tokens, HKV, D, generator=gen).bfloat16()  # the model's fused qkv
    v = torch.randn(num_tokens, HKV, D, generator=gen).bfloat16()
    base_ms, base = time_step("torch", kv, meta, q, k, v, reps)
    fast_ms, fast = time_step("cpu", kv, meta, q, k, v, reps)
    err = (fast.float() - base.float()).abs().max().item()
    print(
        f"{name:8s} torch backend {base_ms:7.1f} ms   cpu backend {fast_ms:7.1f} ms   "
        f"speed-up {base_ms / fast_ms:4.2f}x   max |diff| {err:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(
        f"SmolLM2 shapes (Hq {HQ}, Hkv {HKV}, D {D}), bf16, {LAYERS} layers, block {BS}, ", end=""
    )
    print(f"{torch.get_num_threads()} threads")
    decode_lens = sorted(torch.randint(100, 641, (64,), generator=gen).tolist())
    kv, tables = _pool_and_tables(decode_lens, gen)
    compare("decode", kv, decode_meta(decode_lens, tables), len(decode_lens), gen, args.reps)
    prefill_lens = torch.randint(32, 513, (8,), generator=gen).tolist()
    kv, tables = _pool_and_tables(prefill_lens, gen)
    compare("prefill", kv, prefill_meta(prefill_lens, tables), sum(prefill_lens), gen, args.reps)


if __name__ == "__main__":
    main()
