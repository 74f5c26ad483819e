"""What the autoscaler reads from a pod's ``/metrics``: Prometheus text -> typed samples.

Engine pods export vLLM's names (``services/common/metrics.py``): the load gauges
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` / ``vllm:kv_cache_usage_perc`` and
the latency histograms ``vllm:time_to_first_token_seconds`` / ``vllm:inter_token_latency_seconds``.
Routers export ``splitserve_router_cold_start_waiting`` and ``..._cold_start_requests_total``
(``services/router/cold_start.py``). Parsing uses prometheus-client's own parser; a pod whose
text cannot be parsed gives no sample (the autoscaler then holds rather than guess).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
COLD_START_WAITING = "splitserve_router_cold_start_waiting"
COLD_START_REQUESTS = "splitserve_router_cold_start_requests"


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (``counts[i]``: observations <= ``bounds[i]``; the last bound
    is +Inf), as Prometheus keeps them."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def since(self, older: Histogram | None) -> Histogram:
        """The observations made after ``older`` (all of them when it restarted or differs)."""
        if older is None or older.bounds != self.bounds or older.count > self.count:
            return self
        delta = (a - b for a, b in zip(self.counts, older.counts, strict=True))
        return Histogram(self.bounds, tuple(delta))

    def plus(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise ValueError("histograms with different buckets")
        total = (a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Histogram(self.bounds, tuple(total))

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear within the bucket; None with no data.

        A quantile in the +Inf bucket is the highest finite bound (what Prometheus answers).
        """
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound
                width = count - lower_count
                inside = (rank - lower_count) / width if width > 0 else 1.0
                return lower_bound + (bound - lower_bound) * inside
            lower_bound, lower_count = bound, count
        return lower_bound


def sum_histograms(items: Iterable[Histogram]) -> Histogram | None:
    total: Histogram | None = None
    for h in items:
        total = h if total is None else total.plus(h)
    return total


@dataclass(frozen=True)
class EngineSample:
    """One engine pod's load and latency counters at one scrape."""

    pod: str
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    ttft: Histogram | None = None
    itl: Histogram | None = None

    @property
    def load(self) -> float:
        """Requests on the pod (running and waiting)."""
        return self.running + self.waiting


@dataclass(frozen=True)
class RouterSample:
    """One router pod's cold-start queue at one scrape."""

    pod: str
    cold_start_waiting: float = 0.0
    cold_start_requests: float = 0.0  # counter: every request that had to wait, ever


def _families(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
    return out


def _sum(samples: list, name: str) -> float:
    return sum(s.value for s in samples if s.name == name)


def _histogram(samples: list, name: str) -> Histogram | None:
    """One histogram summed over its label sets (a pod has one engine: one set)."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket":
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    if not buckets:
        return None
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds))


def parse_engine(pod: str, text: str) -> EngineSample:
    """An engine pod's sample; ValueError when the text is not Prometheus' format."""
    f = _families(text)
    return EngineSample(
        pod=pod,
        running=_sum(f.get(RUNNING, []), RUNNING),
        waiting=_sum(f.get(WAITING, []), WAITING),
        kv_usage=_sum(f.get(KV_USAGE, []), KV_USAGE),
        ttft=_histogram(f.get(TTFT, []), TTFT),
        itl=_histogram(f.get(ITL, []), ITL),
    )


def parse_router(pod: str, text: str) -> RouterSample:
    f = _families(text)
    return RouterSample(
        pod=pod,
        cold_start_waiting=_sum(f.get(COLD_START_WAITING, []), COLD_START_WAITING),
        cold_start_requests=_sum(f.get(COLD_START_REQUESTS, []), f"{COLD_START_REQUESTS}_total"),
    )
