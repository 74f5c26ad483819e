"""Offline throughput: splitserve LLM.generate vs HF transformers, same model, same run.

64 requests, prompts of 32-512 tokens, 128 output tokens each (EOS ignored), bf16 on the CPU.
Baselines measured in the same process:
  - HF one request at a time (``generate`` per prompt; a sample of the requests, tok/s scales),
  - HF static batching (``generate`` on left-padded batches).
Also reports the KV-cache waste: allocated-but-unused token slots / allocated slots, sampled
after every engine step.

With ``--loras N`` it measures multi-LoRA serving instead: the same requests spread round-robin
over N random rank-16 adapters on all seven projections (PEFT format, written to a temporary
directory), one batch mixing them all, against the base model alone in the same run (target:
>= 0.7x of base throughput).

    .venv/bin/python -P bench/throughput.py [--num-requests 64] [--hf-single-sample 4]
    .venv/bin/python -P bench/throughput.py --loras 4 [--lora-rank 16]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time

import torch


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Token ids from the common part of the vocabulary (skip special tokens at the start).
    return [[rng.randrange(200, vocab) for _ in range(rng.randint(32, 512))] for _ in range(n)]


def build_llm(args, loras=None):
    """The engine; with ``loras``, LoRA on and every adapter loaded (and warmed up)."""
    from splitserve import LLM, SamplingParams

    llm = LLM(
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # random prompts share nothing; keep the comparison plain
        enable_lora=bool(loras),
        max_loras=max(len(loras or ()), 1),
        max_lora_rank=args.lora_rank,
    )
    warm = SamplingParams(max_tokens=2)
    for lora in [None, *(loras or ())]:  # warm-up, each adapter loaded before the clock starts
        llm.generate([[300 + i for i in range(16)]], warm, lora_request=lora)
    return llm


def run_splitserve(prompts, out_len, args):
    llm = build_llm(args)
    return run_workload(llm, prompts, out_len), llm


def run_workload(llm, prompts, out_len, loras=None):
    """Every prompt at once through ``llm``; ``loras``: adapters spread round-robin over the
    requests (None: the base model)."""
    from splitserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    engine = llm.engine
    tag = next(_RUNS)
    for i, p in enumerate(prompts):
        name = loras[i % len(loras)].lora_name if loras else None
        engine.add_request(f"b{tag}-{i}", p, params, lora_name=name)
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
    }


_RUNS = itertools.count()


def make_adapters(root, count: int, rank: int, seed: int):
    """``count`` random LoRA adapters for the default model in PEFT's format (all seven
    projections, rank ``rank``), as LoRARequests."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import AutoConfig

    from splitserve import LoRARequest
    from splitserve.engine.model.loader import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(None))
    h, inter = config.hidden_size, config.intermediate_size
    d = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv),
              "self_attn.v_proj": (h, kv), "self_attn.o_proj": (q, h),
              "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in range(count):
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
        path = Path(root) / f"adapter{n}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
            "target_modules": [m.split(".")[1] for m in shapes],
        }))  # fmt: skip
        out.append(LoRARequest(f"adapter{n}", n + 1, str(path)))
    return out


def run_loras(prompts, args) -> None:
    """Base model alone vs requests spread over ``args.loras`` adapters, on one engine, in
    alternating rounds (base, LoRA, LoRA, base, ...) so that a machine whose speed drifts (other
    load) weighs on both alike. A step without adapters runs exactly the base model's code (the
    LoRA path costs nothing there), so the base rounds measure the base model."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        loras = make_adapters(root, args.loras, args.lora_rank, args.seed)
        llm = build_llm(args, loras)
        runs: dict[str, list[dict]] = {"base": [], "lora": []}
        for r in range(args.rounds):
            order = ("base", "lora") if r % 2 == 0 else ("lora", "base")
            for mode in order:
                result = run_workload(
                    llm, prompts, args.output_len, loras if mode == "lora" else None
                )
                runs[mode].append(result)
                print(f"  round {r + 1} {mode:>4}: {result['tok_per_s']:8.1f} tok/s")
        loads = llm.engine.lora.slots.num_loads
    base, multi = (_total(runs[m]) for m in ("base", "lora"))
    for label, r in (("base model", base), (f"{args.loras} LoRA adapters", multi)):
        ms = r["decode_phase_ms_per_step"]
        print(
            f"splitserve {label:>16}: {r['tok_per_s']:8.1f} output tok/s "
            f"({r['seconds']:.1f} s, {r['steps']} steps, {ms:.0f} ms per decode step)"
        )
    ratio = multi["tok_per_s"] / base["tok_per_s"]
    print(f"adapter loads into slots: {loads}")
    print(f"ratio {args.loras} LoRAs vs base: {ratio:.2f}x (target >= 0.7x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": base, "loras": multi, "ratio": ratio, "num_loras": args.loras}, f)


def _total(results: list[dict]) -> dict:
    """Several runs of one workload as one: tokens and seconds summed."""
    tokens = sum(r["output_tokens"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    steps = sum(r["steps"] for r in results)
    decode = sum(r["decode_phase_ms_per_step"] for r in results) / len(results)
    return {"output_tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "steps": steps, "decode_phase_ms_per_step": decode}  # fmt: skip


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
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"])
    parser.add_argument(
        "--loras",
        type=int,
        default=0,
        help="spread the requests over this many LoRA adapters; compare to base",
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="with --loras: alternating rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from splitserve.engine.model.loader import resolve_model

    prompts = make_prompts(args.num_requests, 49152, args.seed)
    print(f"{len(prompts)} requests, prompt tokens {sum(map(len, prompts))}, "
          f"output {args.output_len} each, torch threads {torch.get_num_threads()}")  # fmt: skip
    if args.loras:
        run_loras(prompts, args)
        return
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
