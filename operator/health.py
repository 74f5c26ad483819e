"""The operator's own metrics and its health endpoints, on one small HTTP server.

- ``/metrics``: Prometheus text; reconcile passes by trigger and result, errors by reason,
  pass durations, and whether this replica leads.
- ``/healthz`` (liveness): the event loop answers, and a leader still holds its lease.
- ``/readyz`` (readiness): the leader once its reconcile loop runs; a standby while it reaches
  the API server (it is ready to take over). A Deployment of two counts both as available.

The metrics live in a registry of their own (no process-wide global), created by whoever runs
the operator and handed to the kopf handlers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

RESULTS = ("ok", "invalid_spec", "apply_failed", "retry")


@dataclass
class OperatorMetrics:
    """Counters of reconcile passes; ``observe()`` times one and counts its outcome."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "splitserve_operator_reconcile",
            "Reconcile passes over InferenceServices, by trigger (change, timer, autoscale) and "
            "result.",
            ["trigger", "result"],
            registry=r,
        )
        self.errors = Counter(
            "splitserve_operator_reconcile_errors",
            "Reconcile passes that failed, by reason (InvalidSpec, ApplyFailed, an exception).",
            ["reason"],
            registry=r,
        )
        self.duration = Histogram(
            "splitserve_operator_reconcile_duration_seconds",
            "Wall time of one reconcile pass (API calls included).",
            ["trigger"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.leader = Gauge(
            "splitserve_operator_leader",
            "1 while this replica holds the leader lease (reconciles), else 0.",
            registry=r,
        )
        self.inferenceservices = Gauge(
            "splitserve_operator_inferenceservices",
            "InferenceServices by their Ready condition, as of each one's last pass.",
            ["ready"],
            registry=r,
        )
        self._ready_by_object: dict[str, str] = {}

    @contextmanager
    def observe(self, trigger: str) -> Iterator[Callable[[str, str], None]]:
        """Times the pass; the caller reports ``(result, error_reason)`` through the yielded
        function (an exception counts as result ``retry`` with its type as the reason)."""
        outcome = {"result": "ok", "reason": ""}

        def report(result: str, reason: str = "") -> None:
            outcome["result"], outcome["reason"] = result, reason

        started = time.perf_counter()
        try:
            yield report
        except Exception as exc:
            report("retry", type(exc).__name__)
            raise
        finally:
            self.duration.labels(trigger).observe(time.perf_counter() - started)
            self.reconciles.labels(trigger, outcome["result"]).inc()
            if outcome["reason"]:
                self.errors.labels(outcome["reason"]).inc()

    def set_ready(self, key: str, ready: str | None) -> None:
        """Record one InferenceService's Ready status ("True", "False"; None: deleted)."""
        if ready is None:
            self._ready_by_object.pop(key, None)
        else:
            self._ready_by_object[key] = ready
        for value in ("True", "False", "Unknown"):
            count = sum(1 for v in self._ready_by_object.values() if v == value)
            self.inferenceservices.labels(value).set(count)


@dataclass
class HealthState:
    """What the endpoints report; the runner updates it."""

    leader_election: bool
    is_leader: Callable[[], bool] = lambda: False
    api_reachable: Callable[[], bool] = lambda: True
    reconciling: bool = False  # the kopf loop runs (leader, or no election at all)
    lease_lost: bool = False

    def ready(self) -> tuple[bool, str]:
        if self.reconciling:
            return True, "reconciling"
        if self.leader_election and not self.is_leader():
            if self.api_reachable():
                return True, "standby: ready to take over the lease"
            return False, "standby: cannot reach the API server"
        return False, "starting"

    def alive(self) -> tuple[bool, str]:
        if self.lease_lost:
            return False, "lost the leader lease"
        return True, "ok"


def make_app(state: HealthState, metrics: OperatorMetrics) -> web.Application:
    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def answer(result: tuple[bool, str]) -> web.Response:
        ok, text = result
        return web.Response(status=200 if ok else 503, text=text + "\n")

    async def readyz(_: web.Request) -> web.Response:
        return answer(state.ready())

    async def healthz(_: web.Request) -> web.Response:
        return answer(state.alive())

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start the endpoints on ``host:port``; stop with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
