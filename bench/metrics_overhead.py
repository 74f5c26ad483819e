"""What the metrics cost on the hot path, against a decode step measured in the same run.

Per step the engine thread adds one ``StepHistogram.observe`` and one ``snapshot`` (the stats it
publishes); per streamed token the decode server observes two histograms (inter-token latency
and its vLLM alias); per finished request about a dozen. This times each with ``timeit`` and
divides by the time of one batch-1 decode step of the default model (``LLM.generate`` of 64
tokens), so the ratio is the share of a step the metrics take.

    .venv/bin/python -P bench/metrics_overhead.py [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import time
import timeit

from prometheus_client import CollectorRegistry


class _Idle:
    def stats(self):
        raise NotImplementedError

    def audit(self):
        raise NotImplementedError

    def health(self):
        raise NotImplementedError


def per_call_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    from splitserve import LLM, SamplingParams
    from splitserve.engine.histogram import StepHistogram, token_buckets
    from splitserve.engine.outputs import RequestTiming
    from splitserve.services.common.metrics import EngineMetrics, FinishedRequest

    llm = LLM(dtype=args.dtype)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(["warm up"], params)
    t0 = time.perf_counter()
    llm.generate(["The quick brown fox"], params)
    step_us = (time.perf_counter() - t0) / args.tokens * 1e6

    hist = StepHistogram(token_buckets(2048))
    metrics = EngineMetrics(CollectorRegistry(), _Idle(), "m", "decode", "decode-0", 8192)
    timing = RequestTiming(0.01, 0.1, 1.0, 1.1)
    done = FinishedRequest("stop", 100, 0, (64,), 1.2, 64, timing)
    costs = {
        "step: histogram observe + snapshot": per_call_us(
            lambda: (hist.observe(17), hist.snapshot()), 20_000
        ),
        "token: inter-token latency (2 histograms)": per_call_us(
            lambda: metrics.token_gap(0.04), 20_000
        ),
        "request: finished (every request-level metric)": per_call_us(
            lambda: (metrics.sample_finished(64, timing), metrics.request_finished(done)), 5_000
        ),
    }
    per_step = (
        costs["step: histogram observe + snapshot"]
        + costs["token: inter-token latency (2 histograms)"]
    )
    report = {
        "decode_step_us_batch1": round(step_us, 1),
        "costs_us": {k: round(v, 2) for k, v in costs.items()},
        "metrics_share_of_a_batch1_step": round(per_step / step_us, 5),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
