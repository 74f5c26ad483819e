"""One role's numbers for one decision: load summed over its pods, latency over the last
interval (the histogram observations made since the previous scrape of each pod).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from splitserve.operator.autoscale.metrics import (
    EngineSample,
    RouterSample,
    sum_histograms,
)

QUANTILE = 0.9


@dataclass(frozen=True)
class RoleSignals:
    """What a role's ready pods reported; ``pods`` 0 means none answered."""

    pods: int = 0
    running: float = 0.0  # summed over the pods
    waiting: float = 0.0
    kv_usage: float = 0.0  # mean of the pods
    ttft_p90: float | None = None  # None: nothing observed in the interval
    itl_p90: float | None = None

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0

    def describe(self) -> str:
        """The numbers, for events and status messages."""
        parts = [
            f"{self.pods} pods",
            f"running {self.running:g}",
            f"waiting {self.waiting:g}",
            f"kv {self.kv_usage:.2f}",
        ]
        if self.ttft_p90 is not None:
            parts.append(f"ttft p90 {self.ttft_p90:.3f}s")
        if self.itl_p90 is not None:
            parts.append(f"itl p90 {self.itl_p90:.3f}s")
        return ", ".join(parts)


@dataclass(frozen=True)
class RouterSignals:
    """The routers' cold-start queue: requests held now, and new ones since the last pass."""

    waiting: float = 0.0
    new_requests: float = 0.0

    @property
    def demand(self) -> bool:
        return self.waiting > 0 or self.new_requests > 0


def role_signals(
    samples: Sequence[EngineSample], previous: Mapping[str, EngineSample]
) -> RoleSignals:
    """``samples`` of one role's pods now; ``previous``: the last sample of each pod (pods seen
    for the first time add no latency: their histograms hold their whole life, not the last
    interval)."""
    if not samples:
        return RoleSignals()
    ttft = sum_histograms(
        s.ttft.since(previous[s.pod].ttft)
        for s in samples
        if s.ttft is not None and s.pod in previous
    )
    itl = sum_histograms(
        s.itl.since(previous[s.pod].itl) for s in samples if s.itl is not None and s.pod in previous
    )
    return RoleSignals(
        pods=len(samples),
        running=sum(s.running for s in samples),
        waiting=sum(s.waiting for s in samples),
        kv_usage=sum(s.kv_usage for s in samples) / len(samples),
        ttft_p90=ttft.quantile(QUANTILE) if ttft is not None else None,
        itl_p90=itl.quantile(QUANTILE) if itl is not None else None,
    )


def router_signals(samples: Sequence[RouterSample], previous_total: float | None) -> RouterSignals:
    """The routers' held requests; ``previous_total``: their cold-start counter last pass (None
    on the first pass: no new requests are assumed)."""
    total = sum(s.cold_start_requests for s in samples)
    new = 0.0 if previous_total is None else max(0.0, total - previous_total)
    return RouterSignals(waiting=sum(s.cold_start_waiting for s in samples), new_requests=new)
