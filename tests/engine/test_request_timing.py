"""The engine measures where each request's time went and how many tokens each step ran: the
inputs of vLLM's request-level histograms and ``vllm:iteration_tokens_total``."""

from __future__ import annotations

from splitserve import LLM, SamplingParams
from splitserve.engine.histogram import StepHistogram, token_buckets


def test_step_histogram_counts_cumulatively_with_an_inf_bucket():
    assert token_buckets(2048) == (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    h = StepHistogram((1, 8, 16))
    for v in (1, 5, 8, 9, 100):
        h.observe(v)
    snap = h.snapshot()
    assert snap.upper_bounds == (1, 8, 16, float("inf"))
    assert snap.cumulative_counts == (1, 3, 4, 5) and snap.count == 5
    assert snap.total == 123


def test_finished_deltas_carry_consistent_timing_and_steps_are_counted(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=8)
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2)
    core.add_request("r", list(range(5, 45)), params)
    finished = []
    steps = 0
    while len(finished) < 2:
        finished += [d for d in core.step() if d.finished]
        steps += 1
    for d in finished:
        t = d.timing
        assert t is not None and t.num_preemptions == 0
        assert min(t.queued, t.prefill, t.decode, t.inference) >= 0
        assert abs(t.inference - (t.prefill + t.decode)) < 1e-6
        assert t.decode > 0  # five more tokens after the first
    snap = core.stats().step_tokens
    assert snap.count == steps
    # the 40-token prompt once, then one token per sample per step
    assert snap.total == 40 + 2 * 5


def test_unfinished_deltas_carry_no_timing(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", block_size=8)
    core = llm.engine
    core.add_request("r", [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=3))
    deltas = []
    while not any(d.finished for d in deltas):
        deltas += core.step()
    assert all(d.timing is None for d in deltas if not d.finished)
