"""Speculative decoding (n-gram prompt lookup): speed-up and acceptance, baseline in the same run.

Two workloads of chat prompts to SmolLM2-135M-Instruct, greedy, ``--max-tokens`` each:

  edit   "rewrite this code / text with a small change": the answer copies long runs of the
         prompt, which is where prompt lookup pays (code edits, RAG answers quoting sources);
  open   open-ended questions: little to copy, drafts are mostly rejected (the cost side).

Each workload runs offline (``LLM.generate``) at concurrency 1 (one request at a time) and 8
(a batch), without speculation and with ``--spec`` (default ngram, 4 drafts, lookup 2-4), in
one process on one engine configuration, in ``--rounds`` alternating rounds (median time of
each side: other jobs' load drifts over minutes on a shared machine). Reported: output
tokens/s, the speed-up, acceptance rate (accepted / draft tokens), mean tokens per
verification (1 + accepted drafts), and how many outputs are token-identical to the baseline's
(greedy: all of them, up to floating-point ties in bf16, where a verification's matmul shapes
differ from a decode's).

    .venv/bin/python -P bench/spec_decode.py [--dtype auto] [--max-tokens 128] [--rounds 3]
        [--threads 1]
        [--spec '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                  "prompt_lookup_min": 2}'] [--out spec-decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
TEXT = (
    "The committee met on Tuesday to review the budget for the new library. Members agreed "
    "that the children's section needs more space, that the opening hours should be extended "
    "on weekends, and that the reading room will get new chairs and better lighting. The "
    "final plan will be presented to the city council next month."
)
EDIT = [
    f"Rename the function merge_sorted to merge_lists in this code and return the full code:\n\n"
    f"{CODE}",
    f"Add a type hint (list[int]) to both parameters of this function. Return the whole "
    f"function:\n\n{CODE}",
    f"Copy this paragraph, replacing 'Tuesday' with 'Monday':\n\n{TEXT}",
    f"Repeat the following text exactly, then add one sentence at the end:\n\n{TEXT}",
]
OPEN = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Explain what a hash table is.",
]
DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}  # fmt: skip


def run(llm, prompts: list[list[int]], params, concurrency: int) -> tuple[float, float, list, int]:
    """(wall seconds, CPU seconds of this process, token ids per prompt, output tokens) for the
    prompts run ``concurrency`` at a time."""
    outs, tokens = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(prompts), concurrency):
        for o in llm.generate(prompts[start : start + concurrency], params):
            outs.append(o.outputs[0].token_ids)
            tokens += len(o.outputs[0].token_ids)
    return time.perf_counter() - t0, time.process_time() - c0, outs, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--spec", default=json.dumps(DEFAULT_SPEC))
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/ngram rounds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from splitserve import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)

    base = LLM(dtype=args.dtype, kv_cache_memory_bytes=256 << 20, max_num_seqs=8)
    spec = LLM(dtype=args.dtype, kv_cache_memory_bytes=256 << 20, max_num_seqs=8,
               speculative_config=json.loads(args.spec))  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results = {"dtype": str(base.engine.config.torch_dtype), "spec": json.loads(args.spec),
               "max_tokens": args.max_tokens, "runs": []}  # fmt: skip
    warm = [base.apply_chat_template([{"role": "user", "content": "hi"}])]
    run(base, warm, params, 1)
    run(spec, warm, params, 1)
    for name, texts in (("edit", EDIT), ("open", OPEN)):
        prompts = [base.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        for c in (int(x) for x in args.concurrency.split(",")):
            # Alternating rounds, median of each side: load from other jobs drifts over minutes.
            b_times, s_times, b_cpus, s_cpus = [], [], [], []
            before = spec.engine.stats().spec_decode
            for _ in range(args.rounds):
                b_s, b_cpu, b_out, b_tok = run(base, prompts, params, c)
                s_s, s_cpu, s_out, s_tok = run(spec, prompts, params, c)
                b_times.append(b_s)
                s_times.append(s_s)
                b_cpus.append(b_cpu)
                s_cpus.append(s_cpu)
            b_s, s_s = statistics.median(b_times), statistics.median(s_times)
            b_cpu, s_cpu = statistics.median(b_cpus), statistics.median(s_cpus)
            after = spec.engine.stats().spec_decode
            drafts = after.num_draft_tokens - before.num_draft_tokens
            accepted = after.num_accepted_tokens - before.num_accepted_tokens
            verifications = after.num_drafts - before.num_drafts
            row = {
                "workload": name,
                "concurrency": c,
                "baseline_tok_s": b_tok / b_s,
                "spec_tok_s": s_tok / s_s,
                "speedup": (s_tok / s_s) / (b_tok / b_s),
                # per CPU second of the engine process: steadier than wall time on a machine
                # other jobs load (with --threads 1 it is the work the engine did)
                "baseline_tok_per_cpu_s": b_tok / b_cpu,
                "spec_tok_per_cpu_s": s_tok / s_cpu,
                "cpu_speedup": (s_tok / s_cpu) / (b_tok / b_cpu),
                "acceptance_rate": accepted / drafts if drafts else 0.0,
                "tokens_per_verification": 1 + accepted / verifications if verifications else 1,
                "identical_outputs": sum(a == b for a, b in zip(b_out, s_out, strict=True)),
                "outputs": len(b_out),
            }
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(render_markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def render_markdown(results: dict) -> str:
    lines = [
        "| workload | concurrency | tok/s base / ngram (wall) | speed-up (wall) "
        "| tok per CPU-s base / ngram | speed-up (CPU) | acceptance | tokens per verification "
        "| identical outputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} "
            f"| {r['baseline_tok_s']:.1f} / {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x "
            f"| {r['baseline_tok_per_cpu_s']:.1f} / {r['spec_tok_per_cpu_s']:.1f} "
            f"| {r['cpu_speedup']:.2f}x | {100 * r['acceptance_rate']:.0f}% "
            f"| {r['tokens_per_verification']:.2f} | {r['identical_outputs']}/{r['outputs']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
