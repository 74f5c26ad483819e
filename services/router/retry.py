"""A retry budget: retries are allowed only while they stay a small share of recent traffic.

Retrying every failed request on another pod is right when one pod dies and wrong when the whole
pool is overloaded (retries would multiply the load exactly when it hurts). Like Finagle's and
Envoy's budgets, each request deposits ``ratio`` of a retry token; each retry spends one; a small
floor (``min_tokens``) lets a quiet router still retry. Per request, ``max_attempts`` caps tries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3  # tries per request, the first included
    ratio: float = 0.2  # retries allowed per request, on average
    min_tokens: float = 10.0  # retries always available (refilled over `window_s`)
    window_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.ratio < 0 or self.min_tokens < 0 or self.window_s <= 0:
            raise ValueError(f"invalid retry config: {self}")


class RetryBudget:
    """Token bucket shared by all requests of one router."""

    def __init__(self, config: RetryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._tokens = config.min_tokens
        self._last = clock()
        self.retries = 0
        self.denied = 0

    def _refill(self) -> None:
        now = self._clock()
        cfg = self.config
        # The floor refills at min_tokens per window; deposits from requests come on top.
        self._tokens = min(
            self._tokens + (now - self._last) * cfg.min_tokens / cfg.window_s,
            max(cfg.min_tokens, self._tokens),
        )
        self._last = now

    def on_request(self) -> None:
        self._refill()
        cap = self.config.min_tokens + self.config.ratio * 1000
        self._tokens = min(self._tokens + self.config.ratio, cap)

    def try_retry(self, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based; 2 = the first retry) may run."""
        if attempt > self.config.max_attempts:
            return False
        self._refill()
        if self._tokens < 1.0:
            self.denied += 1
            return False
        self._tokens -= 1.0
        self.retries += 1
        return True
