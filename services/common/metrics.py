"""Prometheus metrics of an engine server: vLLM's names, types, buckets and labels.

Every metric carries ``model_name`` and ``engine`` (vLLM's two labels; ``engine`` is the engine id)
and ``role`` (prefill / decode). Load gauges, prefix-cache counters, preemptions and the
per-step token histogram are read from the engine's latest stats at scrape time (a custom
collector), so they can never drift from the engine and cost the step nothing; per-request
histograms and token counters are recorded by the servers as requests finish, from the
``RequestTiming`` the engine measured. Every metric lives in the registry passed in, so several
servers can share one test process.

Each token and each request is counted once across a prefill/decode pair:

- prompt tokens (``vllm:prompt_tokens``) by the pod that computed them: the prefill pod, or the
  decode pod when it ran the prompt itself (colocated, no hand-off);
- generated tokens (``vllm:generation_tokens``), finished requests (``vllm:request_success``)
  and the request-level histograms (e2e, decode, inference, prompt / generation lengths, params)
  by the decode pod, which streams every token (the first one, drawn on the prefill pod, too);
- TTFT, queue and prefill times by each pod as it saw them (on a decode pod after a hand-off the
  "prefill" is the KV import); the router's ``splitserve_router_*`` has the client's view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from splitserve.engine.async_engine import EngineHealth
from splitserve.engine.engine_core import EngineStats, KVAudit
from splitserve.engine.outputs import RequestTiming


class EngineState(Protocol):
    """What the metrics read at scrape time (``AsyncEngine`` offers it)."""

    def stats(self) -> EngineStats: ...
    def audit(self) -> KVAudit: ...
    def health(self) -> EngineHealth: ...


# vLLM's buckets, so its dashboards' quantiles read the same
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_GAP_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_N_BUCKETS = (1, 2, 5, 10, 20)


def _buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class _StatsCollector(Collector):
    def __init__(self, engine: EngineState, labels: dict[str, str]) -> None:
        self._engine = engine
        self._labels = labels

    def collect(self) -> Iterator:
        s = self._engine.stats()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", s.kv_cache_usage
        )
        yield gauge("splitserve:kv_cache_blocks_total", "KV blocks in the pool.", s.num_blocks)
        yield gauge("splitserve:kv_cache_blocks_free", "Free KV blocks.", s.num_free_blocks)
        yield counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_queries,
        )  # fmt: skip
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hits,
        )  # fmt: skip
        yield counter("vllm:num_preemptions", "Preempted requests.", s.num_preemptions)
        yield gauge(
            "splitserve:kv_blocks_unaccounted",
            "KV blocks in use that no request, hold or reservation accounts for (a leak; "
            "counted when the engine goes idle).",
            self._engine.audit().unaccounted,
        )
        yield gauge("splitserve:kv_requests_held", "Requests whose KV is held for a hand-off.",
                    s.num_held)  # fmt: skip
        yield gauge(
            "splitserve:grammar_cache_entries",
            "Compiled structured-output grammars cached (bounded by count and bytes).",
            s.grammar_cache_entries,
        )
        yield gauge(
            "splitserve:grammar_cache_bytes",
            "Bytes of the compiled grammars cached.",
            s.grammar_cache_bytes,
        )
        yield gauge(
            "splitserve:prefix_cache_blocks",
            "KV blocks findable in the prefix cache (inside the pool, never beyond it).",
            s.prefix_cached_blocks,
        )
        if s.step_tokens is not None:
            h = HistogramMetricFamily(
                "vllm:iteration_tokens_total",
                "Tokens per engine step (prompt and generated).",
                labels=names,
            )
            buckets = [
                (_bound(b), c)
                for b, c in zip(
                    s.step_tokens.upper_bounds, s.step_tokens.cumulative_counts, strict=True
                )
            ]
            h.add_metric(values, buckets, s.step_tokens.total)
            yield h
        if s.max_loras:
            # vLLM's: the labels carry the adapters (comma-separated names), the value is when
            # they were read. Built per scrape, so no stale label set outlives its adapters.
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            )
            info.add_metric(
                [str(s.max_loras), ",".join(s.waiting_loras), ",".join(s.running_loras)],
                time.time(),
            )
            yield info
        yield gauge(
            "splitserve:engine_serving",
            "1 while the engine makes progress, 0 when it cannot (see its health reason).",
            float(self._engine.health().serving),
        )


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else f"{b:g}"


@dataclass(frozen=True)
class CacheInfo:
    """What ``vllm:cache_config_info`` states (label values, as vLLM names them)."""

    block_size: int
    num_blocks: int
    cache_dtype: str
    enable_prefix_caching: bool
    kv_cache_memory_bytes: int


class EngineMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        engine: EngineState,
        model_name: str,
        role: str,
        engine_id: str = "0",
        max_model_len: int = 8192,
        cache: CacheInfo | None = None,
    ) -> None:
        labels = {"model_name": model_name, "engine": engine_id, "role": role}
        self.registry = registry
        registry.register(_StatsCollector(engine, labels))
        names = list(labels)
        self._labels = labels

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*names, *extra], registry=registry)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=registry)

        tokens = _buckets_1_2_5(max_model_len)
        self.prompt_tokens = counter(
            "vllm:prompt_tokens", "Prompt tokens computed here (see the module doc)."
        ).labels(**labels)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Generated tokens streamed from here."
        ).labels(**labels)
        self.request_success = counter(
            "vllm:request_success", "Finished requests by finish reason.", ("finished_reason",)
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Arrival on this pod to the first token.",
            _TTFT_BUCKETS,
        ).labels(**labels)
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens of one sequence.",
            _TOKEN_GAP_BUCKETS,
        ).labels(**labels)
        # vLLM's older name for the same per-token gap; its dashboards still read it.
        self.tpot_gap = histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token (per gap; deprecated alias of inter_token_latency).",
            _TOKEN_GAP_BUCKETS,
        ).labels(**labels)
        self.request_tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Mean time per output token of one request (decode time / (tokens - 1)).",
            _TOKEN_GAP_BUCKETS,
        ).labels(**labels)
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency on this pod, arrival to finish.",
            _REQUEST_BUCKETS,
        ).labels(**labels)
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Time waiting before the request was first scheduled.",
            _REQUEST_BUCKETS,
        ).labels(**labels)
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "First scheduled to first token (the prompt's compute, or its KV import).",
            _REQUEST_BUCKETS,
        ).labels(**labels)
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "First token to finish.",
            _REQUEST_BUCKETS,
        ).labels(**labels)
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "First scheduled to finish.",
            _REQUEST_BUCKETS,
        ).labels(**labels)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt length of finished requests.", tokens
        ).labels(**labels)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Generated tokens of finished requests (all samples).",
            tokens,
        ).labels(**labels)
        self.request_max_generation = histogram(
            "vllm:request_max_num_generation_tokens",
            "The longest sample of each finished request.",
            tokens,
        ).labels(**labels)
        self.request_n = histogram(
            "vllm:request_params_n", "The n parameter of finished requests.", _N_BUCKETS
        ).labels(**labels)
        self.request_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens parameter, where set.", tokens
        ).labels(**labels)
        self.blocks_reclaimed = counter(
            "splitserve:kv_blocks_reclaimed",
            "KV blocks the orphan reaper freed (held with no live lease: a bug elsewhere).",
        ).labels(**labels)
        if cache is not None:
            info = Gauge(
                "vllm:cache_config_info",
                "Information of the engine's cache config (always 1).",
                ["engine", *(f.name for f in fields(cache))],
                registry=registry,
            )
            info.labels(
                engine=engine_id, **{f.name: _label(getattr(cache, f.name)) for f in fields(cache)}
            ).set(1)

    # --- recorded by the servers --------------------------------------------------------------
    def prefill_done(self, num_prompt_tokens: int, seconds: float, timing: RequestTiming | None):
        """A prompt run to its first tokens on a prefill pod (the decode pod finishes it)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.ttft.observe(seconds)
        if timing is not None:
            self.queue_time.observe(timing.queued)
            self.prefill_time.observe(timing.prefill)

    def first_token(self, ttft: float) -> None:
        self.ttft.observe(ttft)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.tpot_gap.observe(seconds)

    def sample_finished(self, output_tokens: int, timing: RequestTiming | None) -> None:
        """One of a request's samples ended: its tokens and its time per output token."""
        self.generation_tokens.inc(output_tokens)
        if timing is not None and output_tokens > 1:
            self.request_tpot.observe(timing.decode / (output_tokens - 1))

    def request_finished(self, done: FinishedRequest) -> None:
        """Every sample of a request ended on this (decode or colocated) pod."""
        self.request_success.labels(**self._labels, finished_reason=done.finish_reason).inc()
        self.prompt_tokens.inc(done.counted_prompt_tokens)
        self.e2e.observe(done.e2e)
        self.request_prompt_tokens.observe(done.num_prompt_tokens)
        self.request_generation_tokens.observe(sum(done.output_tokens))
        self.request_max_generation.observe(max(done.output_tokens, default=0))
        self.request_n.observe(len(done.output_tokens))
        if done.max_tokens is not None:
            self.request_max_tokens.observe(done.max_tokens)
        t = done.timing
        if t is not None:
            self.queue_time.observe(t.queued)
            self.prefill_time.observe(t.prefill)
            self.decode_time.observe(t.decode)
            self.inference_time.observe(t.inference)


@dataclass(frozen=True)
class FinishedRequest:
    """One request as the decode pod saw it end (every sample)."""

    finish_reason: str  # of the last sample to end (vLLM counts a request once)
    num_prompt_tokens: int
    counted_prompt_tokens: int  # 0 after a hand-off: the prefill pod counted them
    output_tokens: tuple[int, ...]  # per sample
    e2e: float
    max_tokens: int | None
    timing: RequestTiming | None  # of sample 0


def _label(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
