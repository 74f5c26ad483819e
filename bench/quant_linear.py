"""One projection's cost by batch rows: the model dtype (``nn.Linear``) against ``int8`` and
``w8a8`` weights, SmolLM2-135M's shapes, one torch thread, CPU time of this thread.

Where quantization pays as the batch grows: the evidence for which performance mode sets which
scheme (docs/performance.md). Each cell is the best of ``--repeats`` runs of ``--calls`` calls.

    .venv/bin/python -P bench/quant_linear.py [--dtype float32] [--rows 1,5,16,32,128]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from splitserve.engine.model.quant.linear import Int8Linear, W8A8Linear

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rows", default="1,5,16,32,128", help="batch rows (tokens) per call")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
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
