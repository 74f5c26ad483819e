"""Benchmark the Triton paged-attention kernels against a vectorized torch path.

On a CUDA device: times each kernel (median of many runs, CUDA events) and the torch path that
does the same job (block gather + scaled_dot_product_attention, the engine's torch backend
approach), and reports achieved bandwidth over the bytes each kernel must move (KV it reads,
q/out, K/V rows it writes) plus TFLOP/s for prefill. On CPU it says it skipped, unless
`--smoke`, which runs tiny shapes through Triton's interpreter to check this script end to end
(timings then mean nothing).

    .venv/bin/python -P bench/kernels.py [--dtype bfloat16] [--runs 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16


@dataclass(frozen=True)
class Result:
    kernel: str
    shape: str
    case: str
    triton_us: float
    torch_us: float
    bytes_moved: int
    flops: float

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.triton_us / 1e3

    @property
    def speedup(self) -> float:
        return self.torch_us / self.triton_us


MODELS = [
    Shape("smollm2-135m", 9, 3, 64),  # the default model: GQA 3, head_dim 64
    Shape("llama-8b", 32, 8, 128),  # GQA 4, head_dim 128
]
FULL = {
    "cache_tokens": [256, 4096],
    "decode": [(1, 1024), (32, 1024), (64, 4096), (8, 32768)],  # (batch, context)
    "prefill": [(1, 0, 2048), (4, 1536, 512), (16, 0, 512)],  # (batch, cached, new)
}
SMOKE = {"cache_tokens": [8], "decode": [(2, 70)], "prefill": [(2, 20, 9)]}


def median_us(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Refuse to time a kernel whose output disagrees with the torch path."""
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if not err < 2e-2:
        raise AssertionError(f"{name}: triton and torch disagree (relative error {err:.3g})")


def make_pool(shape: Shape, seq_lens: list[int], dtype, device, num_layers: int = 2):
    """A block-major pool sized for the batch, blocks handed out in shuffled order."""
    blocks = [-(-n // shape.block_size) for n in seq_lens]
    total = sum(blocks)
    kv = torch.randn(
        total,
        num_layers,
        2,
        shape.block_size,
        shape.num_kv_heads,
        shape.head_dim,
        dtype=dtype,
        device=device,
    )
    perm = torch.randperm(total, device=device).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    cursor = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = perm[cursor : cursor + n]
        cursor += n
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return kv, tables, lens


def torch_gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    b, nb = tables.shape
    _, bs, h, d = cache.shape
    return cache[tables.long()].view(b, nb * bs, h, d).transpose(1, 2)


def bench_cache(shape: Shape, tokens: int, dtype, device, runs: int) -> Result:
    from splitserve.kernels import reshape_and_cache

    kv, _, _ = make_pool(shape, [tokens], dtype, device)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    key = torch.randn(tokens, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    slots = torch.randperm(tokens, device=device)
    blocks, offsets = slots // shape.block_size, slots % shape.block_size

    def torch_path() -> None:
        k_cache[blocks, offsets] = key
        v_cache[blocks, offsets] = value

    reshape_and_cache(key, value, k_cache, v_cache, slots)
    if not (
        torch.equal(k_cache[blocks, offsets], key) and torch.equal(v_cache[blocks, offsets], value)
    ):
        raise AssertionError("reshape_and_cache: rows not written")
    t = median_us(lambda: reshape_and_cache(key, value, k_cache, v_cache, slots), runs, device)
    r = median_us(torch_path, runs, device)
    moved = 4 * key.numel() * key.element_size() + slots.numel() * 8
    return Result("reshape_and_cache", shape.name, f"T={tokens}", t, r, moved, 0.0)


def bench_decode(shape: Shape, batch: int, ctx: int, dtype, device, runs: int) -> Result:
    from splitserve.kernels import paged_decode_attention

    kv, tables, lens = make_pool(shape, [ctx] * batch, dtype, device)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.randn(batch, shape.num_heads, shape.head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    scale = 1 / math.sqrt(shape.head_dim)
    keys_pos = torch.arange(tables.shape[1] * shape.block_size, device=device)
    mask = (keys_pos[None, :] < lens[:, None]).view(batch, 1, 1, -1)

    def torch_path() -> torch.Tensor:
        k = torch_gather(k_cache, tables)
        v = torch_gather(v_cache, tables)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        return o.squeeze(2)

    def triton_path() -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, out)

    check_close("paged_decode", triton_path(), torch_path())
    t = median_us(triton_path, runs, device)
    r = median_us(torch_path, runs, device)
    elt = q.element_size()
    moved = 2 * batch * ctx * shape.num_kv_heads * shape.head_dim * elt + 2 * q.numel() * elt
    flops = 4.0 * batch * ctx * shape.num_heads * shape.head_dim
    return Result("paged_decode", shape.name, f"B={batch} ctx={ctx}", t, r, moved, flops)


def bench_prefill(shape: Shape, batch: int, cached: int, new: int, dtype, device, runs: int):
    from splitserve.kernels import paged_prefill_attention

    seq = cached + new
    kv, tables, lens = make_pool(shape, [seq] * batch, dtype, device)
    k_cache, v_cache = kv[:, 0, 0], kv[:, 0, 1]
    q = torch.randn(batch * new, shape.num_heads, shape.head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=device)
    scale = 1 / math.sqrt(shape.head_dim)
    keys_pos = torch.arange(tables.shape[1] * shape.block_size, device=device)
    rows = torch.arange(new, device=device)
    mask = (keys_pos[None, :] <= cached + rows[:, None]) & (keys_pos[None, :] < seq)

    def torch_path() -> torch.Tensor:
        k = torch_gather(k_cache, tables)
        v = torch_gather(v_cache, tables)
        qb = q.view(batch, new, shape.num_heads, shape.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape_as(q)

    def triton_path() -> torch.Tensor:
        return paged_prefill_attention(
            q, k_cache, v_cache, tables, qsl, lens, scale, out, max_query_len=new
        )

    check_close("paged_prefill", triton_path(), torch_path())
    t = median_us(triton_path, runs, device)
    r = median_us(torch_path, runs, device)
    elt = q.element_size()
    moved = 2 * batch * seq * shape.num_kv_heads * shape.head_dim * elt + 2 * q.numel() * elt
    # causal: each new token i attends to cached + i + 1 keys
    pairs = batch * (new * cached + new * (new + 1) / 2)
    flops = 4.0 * pairs * shape.num_heads * shape.head_dim
    return Result(
        "paged_prefill", shape.name, f"B={batch} cached={cached} new={new}", t, r, moved, flops
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Triton paged-attention kernel benchmark")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU via the interpreter"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, cases, runs = torch.device("cpu"), SMOKE, 2
    elif torch.cuda.is_available():
        device, cases, runs = torch.device("cuda"), FULL, args.runs
    else:
        print("bench/kernels.py: skipped (no CUDA device; --smoke runs tiny shapes on CPU)")
        return 0
    dtype = getattr(torch, args.dtype)
    if args.smoke and dtype == torch.float16:
        dtype = torch.float32  # fp16 on this CPU is ~1000x slower
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}  dtype: {str(dtype).removeprefix('torch.')}  runs: {runs}")
    results: list[Result] = []
    for shape in MODELS:
        for tokens in cases["cache_tokens"]:
            results.append(bench_cache(shape, tokens, dtype, device, runs))
        for batch, ctx in cases["decode"]:
            results.append(bench_decode(shape, batch, ctx, dtype, device, runs))
        for batch, cached, new in cases["prefill"]:
            results.append(bench_prefill(shape, batch, cached, new, dtype, device, runs))
    header = (
        f"{'kernel':<18} {'shape':<13} {'case':<28} {'triton us':>10} {'torch us':>10} "
        f"{'speedup':>8} {'GB/s':>8} {'TFLOP/s':>8}"
    )
    print(header)
    for r in results:
        tflops = r.flops / r.triton_us / 1e6
        print(
            f"{r.kernel:<18} {r.shape:<13} {r.case:<28} {r.triton_us:>10.1f} {r.torch_us:>10.1f} "
            f"{r.speedup:>7.2f}x {r.gbps:>8.1f} {tflops:>8.2f}"
        )
    if args.json:
        payload = {
            "device": name,
            "dtype": str(dtype),
            "results": [asdict(r) | {"gbps": r.gbps, "speedup": r.speedup} for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
