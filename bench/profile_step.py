"""Where one engine step spends its time: a prefill-heavy batch and decode steps (torch.profiler
op tables), and with ``--breakdown`` a decode step cut into the engine's stages and the model's
parts (norms, each projection, rope + cache write + attention, MLP activation, LM head, sampler).

.venv/bin/python -P bench/profile_step.py [--batch 64] [--rows 15]
.venv/bin/python -P bench/profile_step.py --batch 1 --breakdown --threads 1 --dtype float32 \
    [--quantization int8]

The breakdown times each part by CPU time of this thread (``time.thread_time``), not wall
time, so other processes on a shared machine do not inflate it: run it with ``--threads 1``
(with more threads, work done by the other threads is not counted). Timing hooks cost ~2 us per
module call; the row "hook overhead" estimates and subtracts that, and "step (no hooks)" is the
same step measured without them.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from splitserve import LLM, SamplingParams


def _profile_prefill_and_decode(engine, args, prompts) -> None:
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


class _Clock:
    """Inclusive CPU time per label, and how many timed calls ran (to price the hooks)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self.calls = 0
        self._active: set[str] = set()

    @contextmanager
    def time(self, label: str):
        if label in self._active:  # nested in itself (RMSNorm.add -> forward): count once
            yield
            return
        self._active.add(label)
        start = time.thread_time()
        try:
            yield
        finally:
            self.total[label] += time.thread_time() - start
            self.calls += 1
            self._active.discard(label)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            with self.time(label):
                return fn(*a, **k)

        setattr(obj, name, timed)


def _timed_call(clock: _Clock, label: str, fn, *args, **kwargs):
    with clock.time(label):
        return fn(*args, **kwargs)


def _module_label(name: str, module: nn.Module) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("input_layernorm", "post_attention_layernorm"):
        return "rms norm"  # with the residual add before it
    if leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        return leaf
    if leaf in ("self_attn", "mlp"):
        return leaf
    return None


def _install_module_timers(model: nn.Module, clock: _Clock) -> None:
    for name, module in model.named_modules():
        label = _module_label(name, module)
        if label is None:
            continue
        # RMSNorm.add (the residual add fused into the norm) is timed as the norm.
        for method in ("forward", "add") if label == "rms norm" else ("forward",):
            if not hasattr(module, method):  # an older engine (the "before" of a comparison)
                continue
            original = getattr(module, method)

            def timed(*a, _f=original, _l=label, **k):
                with clock.time(_l):
                    return _f(*a, **k)

            setattr(module, method, timed)


def _breakdown(engine, args) -> None:
    """Decode steps of the running batch, cut into stages and model parts (CPU ms per step)."""
    steps = args.steps
    for _ in range(3):  # settle caches and allocator
        engine.step()
    start = time.thread_time()
    for _ in range(steps):
        engine.step()
    plain_ms = (time.thread_time() - start) / steps * 1e3

    clock = _Clock()
    runner, model = engine.runner, engine.model
    clock.wrap(engine.scheduler, "schedule", "schedule")
    clock.wrap(runner, "_prepare", "prepare inputs")
    clock.wrap(runner.backend, "prepare", "attention metadata")
    clock.wrap(model, "forward", "model forward")
    clock.wrap(model, "compute_logits", "LM head")
    sampler = engine.sampler  # called as engine.sampler(...): wrap the attribute, not __call__
    engine.sampler = lambda *a, **k: _timed_call(clock, "sampler", sampler, *a, **k)
    clock.wrap(engine, "_update", "detokenize + stop checks")
    _install_module_timers(model, clock)
    # Price one timed call: the hooks' own cost, subtracted from the parent rows below.
    probe = _Clock()
    t0 = time.thread_time()
    for _ in range(2000):
        with probe.time("x"):
            pass
    hook_s = (time.thread_time() - t0) / 2000
    for _ in range(2):
        engine.step()
    clock.total.clear()
    clock.calls = 0
    start = time.thread_time()
    for _ in range(steps):
        engine.step()
    hooked_ms = (time.thread_time() - start) / steps * 1e3
    ms = {k: v / steps * 1e3 for k, v in clock.total.items()}
    layers = engine.model.arch.num_layers
    per_call = hook_s * 1e3  # ms per timed call
    # Each self_attn / mlp contains 2 timed linears; the forward contains 30 x (2 norms + 2
    # parents + 4 linears) timed calls.
    attn_core = ms["self_attn"] - ms["qkv_proj"] - ms["o_proj"] - 2 * layers * per_call
    mlp_act = ms["mlp"] - ms["gate_up_proj"] - ms["down_proj"] - 2 * layers * per_call
    inner_calls = layers * 8
    layer_rest = ms["model forward"] - ms["self_attn"] - ms["mlp"] - ms["rms norm"]
    layer_rest -= inner_calls * per_call
    stages = ["schedule", "prepare inputs", "attention metadata", "LM head", "sampler"]
    stages.append("detokenize + stop checks")
    accounted = sum(ms[s] for s in stages) + ms["model forward"]
    rows = [
        ("step (no hooks)", plain_ms),
        ("  schedule", ms["schedule"]),
        ("  prepare inputs (tokens, positions, slots, tables)", ms["prepare inputs"]),
        ("  attention metadata (backend.prepare)", ms["attention metadata"]),
        ("  model forward", ms["model forward"] - inner_calls * per_call),
        ("    residual add + rms norm (2 per layer)", ms["rms norm"]),
        ("    qkv_proj", ms["qkv_proj"]),
        ("    rope + KV write + attention + reshapes", attn_core),
        ("    o_proj", ms["o_proj"]),
        ("    gate_up_proj", ms["gate_up_proj"]),
        ("    silu * up", mlp_act),
        ("    down_proj", ms["down_proj"]),
        ("    embed, rotary tables, layer calls, final norm", layer_rest),
        ("  LM head", ms["LM head"]),
        ("  sampler", ms["sampler"]),
        ("  detokenize + stop checks", ms["detokenize + stop checks"]),
        ("  rest of the step (runner, engine bookkeeping)", hooked_ms - accounted),
        ("hook overhead (subtracted above)", clock.calls / steps * per_call),
    ]
    print(f"decode step breakdown: batch {len(engine.scheduler.running)}, {steps} steps, "
          f"{torch.get_num_threads()} thread(s), CPU ms per step")  # fmt: skip
    for label, value in rows:
        print(f"{label:<56} {value:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--skip-decode", type=int, default=0, help="decode steps before profiling")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--prompt-len", type=int, default=0, help="fixed prompt length")
    parser.add_argument(
        "--breakdown", action="store_true", help="stage/part table of decode steps instead"
    )
    parser.add_argument(
        "--unfused", action="store_true", help="torch ops for norms/rotary/SiLU (the old path)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # quantization only when asked: the script also profiles older engines without the option
    extra = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(dtype=args.dtype, max_num_seqs=args.batch, enable_prefix_caching=False, **extra)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(200, 49152) for _ in range(args.prompt_len or rng.randint(32, 512))]
        for _ in range(args.batch)
    ]
    engine = llm.engine
    if args.unfused:
        engine.model.use_cpu_kernels(False)
    params = SamplingParams(
        temperature=0.0, max_tokens=args.skip_decode + 2 * args.steps + 16, ignore_eos=True
    )
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    if not args.breakdown:
        _profile_prefill_and_decode(engine, args, prompts)
        return
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    _breakdown(engine, args)


if __name__ == "__main__":
    main()
