"""One projection's cost by batch rows: the model dtype (``nn.Linear``) against ``int8`` and
``w8a8`` weights, SmolLM2-135M's shapes, one torch thread, CPU time of this thread.

Where quantization pays as the batch grows: the evidence for which performance mode sets which
scheme (docs/performance.md). Each cell is the best of ``--repeats`` runs of ``--calls`` calls.

    .venv/bin/python -P bench/quant_linear.py [--dtype float32] [--rows 1,5,16,32,128]

With ``--dense``: torch's matmul (``F.linear``, what the model ran before) against the dense C++
kernel (``kernels/cpu/dense_linear.cpp``) over float32 and bf16 weights, each projection
repeated as 30 layers' worth of distinct weights, so they stream from memory as in a decode step
(one weight called 40 times stays in cache and flatters both). Prints GB/s of weight read.

    .venv/bin/python -P bench/quant_linear.py --dense [--rows 1,4,8,16,32,64] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from splitserve.engine.model.quant.linear import Int8Linear, W8A8Linear
from splitserve.kernels import cpu

# (in_features, out_features) of SmolLM2-135M's fused gate+up, down and LM head projections
SHAPES = {"gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def ms_per_call(layer: nn.Module, x: torch.Tensor, calls: int, repeats: int) -> float:
    layer(x)  # first call: lazy init, caches
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            layer(x)
        best = min(best, (time.thread_time() - start) / calls * 1e3)
    return best


def seconds_per_pass(fn, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    """Wall seconds of one call per weight, best of ``repeats`` passes (after one warm pass)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, time.perf_counter() - start)
    return best


def dense_table(rows: list[int], repeats: int) -> None:
    """torch matmul vs the dense kernel, weights streamed from memory (see the docstring)."""
    print("| projection | weight dtype | rows | torch ms | dense ms | torch GB/s | dense GB/s "
          "| torch / dense |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, (fan_in, fan_out) in SHAPES.items():
        layers = 2 if fan_out > 10_000 else 30  # the LM head is one layer; two copies > cache
        for dtype in (torch.float32, torch.bfloat16):
            weights = [torch.randn(fan_out, fan_in).to(dtype) for _ in range(layers)]
            gbytes = layers * weights[0].numel() * weights[0].element_size() / 1e9
            for n in rows:
                x = torch.randn(n, fan_in).to(dtype)
                base = seconds_per_pass(torch.nn.functional.linear, weights, x, repeats)
                ours = seconds_per_pass(cpu.dense_linear, weights, x, repeats)
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {n} | "
                      f"{base * 1e3 / layers:.3f} | {ours * 1e3 / layers:.3f} | "
                      f"{gbytes / base:.1f} | {gbytes / ours:.1f} | {base / ours:.2f} |",
                      flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rows", default="1,5,16,32,128", help="batch rows (tokens) per call")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense", action="store_true", help="torch vs the dense kernel (docstring)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.dense:
        if not cpu.available():
            raise SystemExit("the C++ CPU kernels could not be built (see the log)")
        with torch.inference_mode():
            dense_table([int(r) for r in args.rows.split(",")], args.repeats)
        return
    dtype = getattr(torch, args.dtype)
    print(f"| projection | rows | {args.dtype} ms | int8 ms | w8a8 ms | int8 / {args.dtype} "
          f"| w8a8 / {args.dtype} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (fan_in, fan_out) in SHAPES.items():
            dense = nn.Linear(fan_in, fan_out, bias=False).to(dtype)
            layers = (dense, Int8Linear.from_linear(dense), W8A8Linear.from_linear(dense))
            calls = max(4, args.calls // 4) if fan_out > 10_000 else args.calls
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, fan_in, dtype=dtype)
                base, i8, w8 = (ms_per_call(m, x, calls, args.repeats) for m in layers)
                print(f"| {name} | {rows} | {base:.3f} | {i8:.3f} | {w8:.3f} | {i8 / base:.2f} "
                      f"| {w8 / base:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
