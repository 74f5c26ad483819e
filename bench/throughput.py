"""Offline throughput: splitserve LLM.generate vs HF transformers, same model, same run.

64 requests, prompts of 32-512 tokens, 128 output tokens each (EOS ignored), bf16 on the CPU.
Baselines measured in the same process:
  - HF one request at a time (``generate`` per prompt; a sample of the requests, tok/s scales),
  - HF static batching (``generate`` on left-padded batches).
Also reports the KV-cache waste: allocated-but-unused token slots / allocated slots, sampled
after every engine step.

    .venv/bin/python -P bench/throughput.py [--num-requests 64] [--hf-single-sample 4]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Token ids from the common part of the vocabulary (skip special tokens at the start).
    return [[rng.randrange(200, vocab) for _ in range(rng.randint(32, 512))] for _ in range(n)]


def run_splitserve(prompts, out_len, args):
    from splitserve import LLM, SamplingParams

    llm = LLM(
        dtype="bfloat16",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # random prompts share nothing; keep the comparison plain
    )
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=2))  # warm-up
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    allocated = used = 0
    steps = 0
    generated = 0
    start = time.perf_counter()
    first_decode_only = None  # when every prompt is done and only decodes remain
    while engine.has_unfinished():
        for delta in engine.step():
            generated += len(delta.token_ids)
        steps += 1
        if (
            first_decode_only is None
            and not engine.scheduler.waiting
            and all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        ):
            first_decode_only = (time.perf_counter() - start, steps)
        bs = engine.kv.block_size
        for req in engine.scheduler.running:
            table = engine.kv.tables.get(req.request_id)
            if table:
                allocated += len(table) * bs
                used += req.num_computed_tokens
    elapsed = time.perf_counter() - start
    engine.check_integrity()
    return {
        "output_tokens": generated,
        "seconds": elapsed,
        "tok_per_s": generated / elapsed,
        "steps": steps,
        "kv_waste": 1 - used / allocated if allocated else 0.0,
        "preemptions": engine.scheduler.num_preemptions,
        "prefill_phase_s": first_decode_only[0] if first_decode_only else elapsed,
        "decode_phase_ms_per_step": (
            (elapsed - first_decode_only[0]) / max(steps - first_decode_only[1], 1) * 1e3
            if first_decode_only
            else 0.0
        ),
    }, llm


def run_hf_single(model, prompts, out_len):
    tokens = 0
    start = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
                pad_token_id=2,
            )
        tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed}


def run_hf_static(model, prompts, out_len, batch_size):
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):  # left padding, as HF generation expects
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
                pad_token_id=2,
            )
        tokens += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-single-sample", type=int, default=4, help="requests HF runs alone")
    parser.add_argument("--skip-hf", action="store_true", help="only measure splitserve")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from splitserve.engine.model.loader import resolve_model

    prompts = make_prompts(args.num_requests, 49152, args.seed)
    print(f"{len(prompts)} requests, prompt tokens {sum(map(len, prompts))}, "
          f"output {args.output_len} each, torch threads {torch.get_num_threads()}")  # fmt: skip
    ours, _ = run_splitserve(prompts, args.output_len, args)
    print(f"splitserve LLM.generate : {ours['tok_per_s']:8.1f} output tok/s "
          f"({ours['output_tokens']} tokens, {ours['seconds']:.1f} s, {ours['steps']} steps, "
          f"KV waste {ours['kv_waste']:.2%}, preemptions {ours['preemptions']})")  # fmt: skip
    print(f"  prompts done after {ours['prefill_phase_s']:.1f} s; then "
          f"{ours['decode_phase_ms_per_step']:.0f} ms per decode step")  # fmt: skip
    if args.skip_hf:
        return
    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.bfloat16).eval()
    single = run_hf_single(model, prompts[: args.hf_single_sample], args.output_len)
    print(f"HF one at a time ({args.hf_single_sample} req): {single['tok_per_s']:8.1f} tok/s")
    static = run_hf_static(model, prompts, args.output_len, args.hf_batch_size)
    print(f"HF static batch {args.hf_batch_size}      : {static['tok_per_s']:8.1f} tok/s "
          f"({static['seconds']:.1f} s)")  # fmt: skip
    ratios = {
        "vs_hf_single": ours["tok_per_s"] / single["tok_per_s"],
        "vs_hf_static": ours["tok_per_s"] / static["tok_per_s"],
    }
    print(f"ratio vs HF one-at-a-time: {ratios['vs_hf_single']:.1f}x (target >= 10x)")
    print(f"ratio vs HF static batch : {ratios['vs_hf_static']:.2f}x (target >= 2x)")
    print(f"KV-cache waste           : {ours['kv_waste']:.2%} (target < 4%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"splitserve": ours, "hf_single": single, "hf_static": static, **ratios}, f)


if __name__ == "__main__":
    main()
