"""Prometheus metrics of an engine server, with vLLM's names where one exists.

Load gauges and prefix-cache counters are read from the engine's latest stats at scrape time (a
custom collector), so they can never drift from the engine; per-request histograms and token
counters are recorded by the servers as requests finish. Every metric lives in the registry passed
in, so several servers can share one test process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitserve.engine.async_engine import EngineHealth
from splitserve.engine.engine_core import EngineStats, KVAudit


class EngineState(Protocol):
    """What the metrics read at scrape time (``AsyncEngine`` offers it)."""

    def stats(self) -> EngineStats: ...
    def audit(self) -> KVAudit: ...
    def health(self) -> EngineHealth: ...


_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)


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
            "splitserve:engine_serving",
            "1 while the engine makes progress, 0 when it cannot (see its health reason).",
            float(self._engine.health().serving),
        )


class EngineMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        engine: EngineState,
        model_name: str,
        role: str,
    ) -> None:
        labels = {"model_name": model_name, "role": role}
        self.registry = registry
        registry.register(_StatsCollector(engine, labels))
        names = list(labels)
        self._labels = labels
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", names, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", names, registry=registry
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*names, "finished_reason"],
            registry=registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to the first token.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.blocks_reclaimed = Counter(
            "splitserve:kv_blocks_reclaimed",
            "KV blocks the orphan reaper freed (held with no live lease: a bug elsewhere).",
            names,
            registry=registry,
        ).labels(**labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to finish.",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def finished(
        self, reason: str, prompt_tokens: int, output_tokens: int, ttft: float | None, e2e: float
    ) -> None:
        labels = self._labels
        self.prompt_tokens.labels(**labels).inc(prompt_tokens)
        self.generation_tokens.labels(**labels).inc(output_tokens)
        self.request_success.labels(**labels, finished_reason=reason).inc()
        if ttft is not None:
            self.ttft.labels(**labels).observe(ttft)
        self.e2e.labels(**labels).observe(e2e)

    def token_gap(self, seconds: float) -> None:
        self.itl.labels(**self._labels).observe(seconds)
