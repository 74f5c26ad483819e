"""What both engine servers build the same way: the engine, its identity and its KV facts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine_core import EngineCore
from splitserve.kvtransfer.pool import allocate_kv_pool
from splitserve.protocol.kv_compat import CompatInfo
from splitserve.services.common.engine_args import engine_config
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.common.serving import run_grpc_server


def kv_transports(args: argparse.Namespace) -> tuple[str, ...]:
    """NIXL first when asked for; gRPC streaming always remains as the fallback."""
    return ("nixl", "grpc") if args.kv_transport == "nixl" else ("grpc",)


@dataclass
class EngineRuntime:
    engine: AsyncEngine
    compat: CompatInfo
    engine_id: str
    epoch: int
    model_name: str
    registry: CollectorRegistry
    metrics: EngineMetrics

    def serve(
        self,
        args: argparse.Namespace,
        services: dict[str, Callable[[grpc.aio.Server], None]],
        on_shutdown: Callable[[], None],
    ) -> None:
        """Serve ``services`` (full gRPC service name -> adder) until SIGTERM / SIGINT."""

        def shutdown() -> None:
            on_shutdown()
            self.engine.shutdown()

        asyncio.run(
            run_grpc_server(
                list(services.values()),
                list(services),
                args.host,
                args.port,
                args.metrics_port,
                self.registry,
                on_shutdown=shutdown,
            )
        )


def build_runtime(args: argparse.Namespace, role: str) -> EngineRuntime:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = engine_config(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    def allocate(shape, dtype):
        # Huge-page backed CPU pool: NIXL/UCX reads of it run several times faster.
        if config.device != "cpu":
            import torch

            return torch.zeros(shape, dtype=dtype, device=config.device)
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = shape
        return allocate_kv_pool(num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype)

    core = EngineCore(config, allocate_kv=allocate)
    shape = core.shape
    model_name = args.served_name or (args.model or core.model_dir.name)
    compat = CompatInfo(
        model=str(args.model or core.model_dir.name),
        revision=args.revision,
        dtype=str(core.kv_cache.dtype).removeprefix("torch."),
        block_size=core.kv.block_size,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
    )
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, core.stats, model_name, role)
    engine = AsyncEngine(core).start()
    return EngineRuntime(
        engine=engine,
        compat=compat,
        engine_id=args.engine_id,
        epoch=secrets.randbits(64),
        model_name=model_name,
        registry=registry,
        metrics=metrics,
    )
