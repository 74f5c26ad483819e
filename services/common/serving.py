"""Run a gRPC engine server: health service, Prometheus endpoint, graceful drain on signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from splitserve.protocol.constants import GRPC_SERVER_OPTIONS
from splitserve.services.common.drain import Drain

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0


class Health(Protocol):
    serving: bool
    reason: str


async def run_grpc_server(
    add_servicers: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    host: str,
    port: int,
    metrics_port: int,
    registry: CollectorRegistry,
    *,
    health: Callable[[], Health] | None = None,
    on_ready: Callable[[int], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
    background: Sequence[Callable[[], object]] = (),
    drain: Drain | None = None,
    drain_seconds: float = 0.0,
    idle: Callable[[], bool] = lambda: True,
) -> None:
    """Serve until SIGTERM / SIGINT; then drain (``services/common/drain.py``) and clean up.

    ``health()`` is polled every second: while it says not serving, gRPC health answers
    NOT_SERVING for every service (the kubelet's readiness probe and the router see it).
    ``background`` coroutine functions run until shutdown (through the drain). On the first
    signal health turns NOT_SERVING for good, ``drain`` refuses new calls and the server waits
    up to ``drain_seconds`` until the calls it tracks are done and ``idle()`` holds (no live KV
    lease); a second signal ends the wait at once.
    """
    # Sync handlers (the KV transfer servicer) run on this pool; async ones on the event loop.
    server = grpc.aio.server(
        migration_thread_pool=ThreadPoolExecutor(max_workers=16), options=GRPC_SERVER_OPTIONS
    )
    for add in add_servicers:
        add(server)
    health_servicer = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    if metrics_port:
        start_http_server(metrics_port, addr=host, registry=registry)
    await server.start()
    names = ("", *service_names)
    await _set_all(health_servicer, names, True)
    log.info("gRPC serving on %s:%d (metrics on %s)", host, bound, metrics_port or "off")
    if on_ready is not None:
        on_ready(bound)
    tasks = [asyncio.create_task(fn()) for fn in background]
    follower = None
    if health is not None:
        follower = asyncio.create_task(_follow_health(health, health_servicer, names))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set() and drain is not None:
            drain.wake()  # a second signal: stop waiting for the work in flight
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    # Not serving from now on, for good: the follower must not turn health back to SERVING.
    if follower is not None:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    await _set_all(health_servicer, names, False)
    if drain is not None:
        drain.begin()
        log.info("draining: no new requests, up to %.0f s for those in flight", drain_seconds)
        await drain.wait(drain_seconds, idle)
    log.info("shutting down")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Whatever still runs is past the drain deadline: a short grace, then it is cut.
    await server.stop(grace=2.0)
    if on_shutdown is not None:
        on_shutdown()


async def _set_all(servicer, names: Sequence[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in names:
        await servicer.set(name, status)


async def _follow_health(health: Callable[[], Health], servicer, names: Sequence[str]) -> None:
    serving = True
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        with contextlib.suppress(Exception):
            now = health()
            if now.serving != serving:
                serving = now.serving
                if serving:
                    log.warning("engine serving again")
                else:
                    log.error("engine not serving: %s", now.reason)
                await _set_all(servicer, names, serving)
