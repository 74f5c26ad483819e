"""`splitserve prefill`: the prefill gRPC server."""

from __future__ import annotations

import argparse
import asyncio

from splitserve.services.common.engine_args import add_engine_arguments, advertised_address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, default_port=50051)
    parser.add_argument("--lease-seconds", type=float, default=30.0)


def run(args: argparse.Namespace) -> int:
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.services.common.engine_service import EngineServicer
    from splitserve.services.common.runtime import build_runtime
    from splitserve.services.common.serving import run_grpc_server
    from splitserve.services.kvtransfer.metrics import TransferMetrics
    from splitserve.services.kvtransfer.servicer import KVServicer
    from splitserve.services.kvtransfer.source import KVBlockSource, SourceConfig
    from splitserve.services.prefill.server import HeldBlocks, PrefillServicer

    rt = build_runtime(args, "prefill")
    held = HeldBlocks()
    core = rt.engine.core

    def free_blocks(block_ids: tuple[int, ...]) -> None:
        # Called from gRPC / reaper threads: hand the release to the engine thread.
        request_id = held.pop(tuple(block_ids))
        if request_id is not None:
            rt.engine.submit(lambda: core.release_kv(request_id))

    # Offer NIXL first when asked for it; gRPC streaming always works as the fallback.
    transports = ("nixl", "grpc") if args.kv_transport == "nixl" else ("grpc",)
    source = KVBlockSource(
        core.kv_cache,
        SourceConfig(
            engine_id=args.engine_id,
            compat=rt.compat,
            grpc_address=advertised_address(args, args.port),
            transports=transports,
            lease_seconds=args.lease_seconds,
        ),
        free_blocks,
        epoch=rt.epoch,
        metrics=TransferMetrics(rt.registry),
    )
    source.start_reaper()
    prefill = PrefillServicer(rt.engine, source, held, rt.metrics)
    engine_svc = EngineServicer(
        rt.engine, "prefill", rt.engine_id, rt.epoch, rt.model_name, lambda: len(source.leases)
    )
    kv_svc = KVServicer(source)  # sync handlers: they run on the server's thread pool

    def shutdown() -> None:
        source.close()
        rt.engine.shutdown()

    asyncio.run(
        run_grpc_server(
            [
                lambda s: pb_grpc.add_PrefillServiceServicer_to_server(prefill, s),
                lambda s: pb_grpc.add_EngineServiceServicer_to_server(engine_svc, s),
                kv_svc.add_to_server,
            ],
            [
                "splitserve.v1.PrefillService",
                "splitserve.v1.KVService",
                "splitserve.v1.EngineService",
            ],
            args.host,
            args.port,
            args.metrics_port,
            rt.registry,
            on_shutdown=shutdown,
        )
    )
    return 0
