"""Where one engine step spends its time (torch.profiler), for prefill-heavy and decode steps.

.venv/bin/python -P bench/profile_step.py [--batch 64] [--rows 15]
"""

from __future__ import annotations

import argparse
import random
import time

from torch.profiler import ProfilerActivity, profile

from splitserve import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--skip-decode", type=int, default=0, help="decode steps before profiling")
    args = parser.parse_args()
    llm = LLM(dtype="bfloat16", max_num_seqs=args.batch, enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(200, 49152) for _ in range(rng.randint(32, 512))] for _ in range(args.batch)
    ]
    engine = llm.engine
    params = SamplingParams(
        temperature=0.0, max_tokens=args.skip_decode + args.steps + 8, ignore_eos=True
    )
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    prompt_tokens = sum(map(len, prompts))
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prefill_prof:
        while engine.scheduler.waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
        ):
            engine.step()
    prefill_s = time.perf_counter() - start
    rate = prompt_tokens / prefill_s
    print(f"prefill: {prompt_tokens} tokens in {prefill_s:.2f} s = {rate:.0f} tok/s")
    print(prefill_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for _ in range(args.skip_decode):
        engine.step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as decode_prof:
        for _ in range(args.steps):
            engine.step()
    step_s = (time.perf_counter() - start) / args.steps
    print(f"decode: batch {len(engine.scheduler.running)}, {step_s * 1e3:.1f} ms/step = "
          f"{len(engine.scheduler.running) / step_s:.0f} tok/s")  # fmt: skip
    print(decode_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
