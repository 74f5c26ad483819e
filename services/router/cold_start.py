"""Holding requests while no pod of the model can serve: scale from zero, cold starts.

With ``--cold-start-timeout T`` (the operator sets it when a pool may scale to zero), a request
that finds no ready prefill/decode pair waits here, up to T seconds, instead of failing at once.
At most ``--cold-start-max-waiting`` requests wait; one more is refused at once. A request that
times out, or finds the queue full, gets a 503 in the OpenAI error shape with ``Retry-After``.

A shorter hold applies without ``--cold-start-timeout`` too, while pods are *changing over*
(``--transition-timeout``, 15 s): no pair is ready but some pod is draining. A rollout deletes
the old generation once the new one is ready to Kubernetes; this router may learn of the new
pods a moment later (its watch, its first stats poll), and a request in that moment would
otherwise get a 503 though nothing is down. Only cold-start waits are counted in the metrics
below (they are the scale-from-zero signal).

The number waiting is exported (``splitserve_router_cold_start_waiting``), with a counter of
every request that had to wait by how it ended (``splitserve_router_cold_start_requests``): the
operator scales a pool up from zero when either moves (docs/autoscaling.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from splitserve.services.router.errors import NoBackendError
from splitserve.services.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a waiting request looks again. Only waiting requests poll, and the check is a
# dictionary scan of the pool: cheap next to a pod's start (seconds to minutes).
POLL_S = 0.1


@dataclass(frozen=True)
class ColdStartConfig:
    """``timeout_s`` 0 turns holding off: no pod means a 503 at once, except while pods change
    over, for up to ``transition_s`` (0: never)."""

    timeout_s: float = 0.0
    max_waiting: int = 256
    transition_s: float = 15.0

    def __post_init__(self) -> None:
        if self.timeout_s < 0 or self.max_waiting < 1 or self.transition_s < 0:
            raise ValueError(f"invalid cold-start settings: {self}")

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0


class ColdStartQueue:
    """The bounded set of requests waiting for a pod. One asyncio loop."""

    def __init__(self, config: ColdStartConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.waiting = 0

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    async def wait(
        self,
        ready: Callable[[], T | None],
        what: str = "a ready pod",
        changing: Callable[[], bool] | None = None,
    ) -> T:
        """``ready()``'s first non-None answer; raises ``NoBackendError`` (503) when holding is
        off, the queue is full, or ``timeout_s`` passes first. With holding off, ``changing()``
        true (pods changing over) still holds the request up to ``transition_s``."""
        found = ready()
        if found is not None:
            return found
        if not self.enabled:
            if changing is not None and self.config.transition_s > 0 and changing():
                found = await self._hold(ready, self.config.transition_s)
                if found is not None:
                    return found
            raise NoBackendError(f"no ready backend pod: {what} is starting or down")
        if self.waiting >= self.config.max_waiting:
            self._count("rejected")
            raise NoBackendError(
                f"no ready backend pod, and {self.waiting} requests already wait for one"
            )
        self.waiting += 1
        self._gauge()
        start = time.monotonic()
        outcome = "timeout"
        try:
            deadline = start + self.config.timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                found = ready()
                if found is not None:
                    outcome = "served"
                    return found
            raise NoBackendError(
                f"no ready backend pod after waiting {self.config.timeout_s:g} s for {what} "
                "to start",
                retry_after_s=5,
            )
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client went away
            raise
        finally:
            self.waiting -= 1
            self._gauge()
            self._count(outcome)
            if outcome == "served":
                log.info("request held %.1f s until a pod was ready", time.monotonic() - start)

    async def _hold(self, ready: Callable[[], T | None], seconds: float) -> T | None:
        """Poll ``ready()`` for up to ``seconds``; uncounted (a change-over, not a cold start)."""
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            found = ready()
            if found is not None:
                log.info("request held %.1f s while pods changed over", time.monotonic() - start)
                return found
        return None

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.cold_start_waiting.set(self.waiting)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.cold_start_requests.labels(outcome).inc()
