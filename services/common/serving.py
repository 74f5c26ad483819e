"""Run a gRPC engine server: health service, Prometheus endpoint, graceful shutdown on signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from splitserve.protocol.constants import GRPC_SERVER_OPTIONS

log = logging.getLogger(__name__)



async def run_grpc_server(
    add_servicers: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    host: str,
    port: int,
    metrics_port: int,
    registry: CollectorRegistry,
    on_ready: Callable[[int], None] | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT; then stop accepting, let streams finish (grace), clean up."""
    # Sync handlers (the KV transfer servicer) run on this pool; async ones on the event loop.
    server = grpc.aio.server(
        migration_thread_pool=ThreadPoolExecutor(max_workers=16), options=GRPC_SERVER_OPTIONS
    )
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    if metrics_port:
        start_http_server(metrics_port, addr=host, registry=registry)
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC serving on %s:%d (metrics on %s)", host, bound, metrics_port or "off")
    if on_ready is not None:
        on_ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5.0)
    if on_shutdown is not None:
        on_shutdown()
