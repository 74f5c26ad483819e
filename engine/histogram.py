"""A fixed-bucket histogram the engine thread fills once per step, read at scrape time.

The engine counts what only it sees each step (tokens in the batch) without touching Prometheus
on its hot path: ``observe`` is a bisect and two additions; servers turn ``snapshot()`` into
vLLM's ``vllm:iteration_tokens_total`` histogram when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound (the last bound is +Inf), and the sum of values."""

    upper_bounds: tuple[float, ...]
    cumulative_counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return self.cumulative_counts[-1] if self.cumulative_counts else 0


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """vLLM's iteration-token buckets (1, 8, 16, 32, ... powers of two) up to the budget."""
    bounds = [1, 8]
    while bounds[-1] < max_tokens:
        bounds.append(bounds[-1] * 2)
    return tuple(bounds)


class StepHistogram:
    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        self._bounds = tuple(upper_bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        cumulative, running = [], 0
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramSnapshot((*self._bounds, float("inf")), tuple(cumulative), self._total)
