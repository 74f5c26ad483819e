"""What both engine servers build the same way: the engine, its identity, its model facts."""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.model.loader import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME
from splitserve.engine.openmp import in_own_thread, serial_in_this_thread
from splitserve.kvtransfer.pool import allocate_kv_pool
from splitserve.observability.logs import setup_logging
from splitserve.observability.tracing import setup_tracing
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.kv_compat import CompatInfo, kv_compat_hash
from splitserve.protocol.tokenizer_files import read_tokenizer_files, tokenizer_id
from splitserve.services.common.drain import Drain
from splitserve.services.common.engine_args import engine_config
from splitserve.services.common.lora import LoRAModule, load_modules, watch_modules_file
from splitserve.services.common.metrics import CacheInfo, EngineMetrics
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
    role: str
    model_name: str
    info: pb.EngineInfo  # what GetInfo answers: the model facts the router relies on
    registry: CollectorRegistry
    metrics: EngineMetrics
    drain: Drain  # the servicers refuse new calls and count those in flight through it

    def serve(
        self,
        args: argparse.Namespace,
        services: dict[str, Callable[[grpc.aio.Server], None]],
        on_shutdown: Callable[[], None],
        background: list[Callable[[], object]] = (),
        idle: Callable[[], bool] = lambda: True,
    ) -> None:
        """Serve ``services`` (full gRPC service name -> adder) until SIGTERM / SIGINT, then
        drain for up to ``--drain-seconds`` (until ``idle()`` and no tracked call is left).

        ``background``: coroutine functions run alongside the server (e.g. reapers).
        """
        if args.lora_modules_file:
            path = Path(args.lora_modules_file)
            background = [*background, lambda: watch_modules_file(self.engine, path)]

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
                health=self.engine.health,
                on_shutdown=shutdown,
                background=background,
                drain=self.drain,
                drain_seconds=args.drain_seconds,
                idle=idle,
            )
        )


def served_names(
    served_name: str | None, model_arg: str | None, model: str
) -> tuple[str, tuple[str, ...]]:
    """The name clients use for the model, and aliases: ``--served-name`` if given; for the
    default model its hub id with the short name as an alias; else the model argument."""
    if served_name:
        return served_name, ()
    if model_arg in (None, "", "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_HUB_ID):
        return DEFAULT_MODEL_HUB_ID, (DEFAULT_MODEL_NAME,)
    short = Path(model).stem if model.endswith(".gguf") else Path(model).name
    return model, (short,) if short != model else ()


def build_runtime(args: argparse.Namespace, role: str) -> EngineRuntime:
    setup_logging(args.log_level, args.log_format, role, args.engine_id)
    setup_tracing(role, args.engine_id)
    config = engine_config(args)
    modules = [LoRAModule.parse(text) for text in args.lora_modules]  # bad flags: before loading
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

    # Built on a thread of its own, and this (the event loop's) thread kept serial: the engine
    # thread's OpenMP team is then the process's only one (engine/openmp.py says why it matters).
    core = in_own_thread(lambda: EngineCore(config, allocate_kv=allocate))
    serial_in_this_thread()
    engine = AsyncEngine(core)
    facts = engine.facts
    model = str(args.model or Path(facts.model_dir).name)
    model_name, aliases = served_names(args.served_name, args.model, model)
    compat = CompatInfo(
        model=model,
        revision=args.revision,
        dtype=facts.kv_dtype,
        block_size=facts.block_size,
        num_layers=facts.num_layers,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        quantization=config.quantization or "",
    )
    epoch = secrets.randbits(64)
    files = read_tokenizer_files(facts.model_dir)
    info = pb.EngineInfo(
        protocol_version=PROTOCOL_VERSION,
        engine_id=args.engine_id,
        epoch=epoch,
        role=role,
        colocated=bool(getattr(args, "colocated", False)),
        served_model_name=model_name,
        served_model_aliases=list(aliases),
        model=model,
        max_model_len=facts.max_model_len,
        vocab_size=facts.vocab_size,
        block_size=facts.block_size,
        kv_compat=compat.to_proto(),
        kv_compat_hash=kv_compat_hash(compat),
        tokenizer_id=tokenizer_id(files),
        tokenizer_files=[pb.TokenizerFile(name=n, content=c) for n, c in files],
        eos_token_ids=list(facts.eos_token_ids),
        max_num_seqs=facts.max_num_seqs,
        lora_enabled=facts.lora_enabled,
        max_loras=facts.max_loras,
        max_lora_rank=facts.max_lora_rank,
    )
    registry = CollectorRegistry()
    cache = CacheInfo(
        block_size=facts.block_size,
        num_blocks=facts.num_blocks,
        cache_dtype=facts.kv_dtype,
        enable_prefix_caching=config.cache.enable_prefix_caching,
        kv_cache_memory_bytes=config.cache.kv_cache_memory_bytes,
    )
    metrics = EngineMetrics(
        registry, engine, model_name, role, args.engine_id, facts.max_model_len, cache
    )
    engine.start()
    if modules:
        try:
            asyncio.run(load_modules(engine, modules))
        except ValueError as exc:  # the flags name adapters that cannot be served
            engine.shutdown()
            raise SystemExit(f"--lora-modules: {exc}") from exc
    return EngineRuntime(
        engine=engine,
        compat=compat,
        engine_id=args.engine_id,
        epoch=epoch,
        role=role,
        model_name=model_name,
        info=info,
        registry=registry,
        metrics=metrics,
        drain=Drain(),
    )
