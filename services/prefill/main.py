"""`splitserve prefill`: the prefill gRPC server."""

from __future__ import annotations

import argparse

from splitserve.services.common.engine_args import add_engine_arguments, advertised_address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, default_port=50051)
    parser.add_argument("--lease-seconds", type=float, default=30.0)


def run(args: argparse.Namespace) -> int:
    from splitserve.kvtransfer.leases import Lease
    from splitserve.kvtransfer.metrics import TransferMetrics
    from splitserve.kvtransfer.servicer import KVServicer
    from splitserve.kvtransfer.source import KVBlockSource, SourceConfig
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.services.common.engine_service import EngineServicer
    from splitserve.services.common.runtime import build_runtime, kv_transports
    from splitserve.services.prefill.server import PrefillServicer

    rt = build_runtime(args, "prefill")
    core = rt.engine.core

    def end_lease(lease: Lease) -> None:
        # Called from gRPC / reaper threads: the engine thread frees the request's held blocks.
        rt.engine.submit(lambda: core.release_kv(lease.request_id))

    source = KVBlockSource(
        core.kv_cache,
        SourceConfig(
            engine_id=args.engine_id,
            compat=rt.compat,
            grpc_address=advertised_address(args, args.port),
            transports=kv_transports(args),
            lease_seconds=args.lease_seconds,
        ),
        end_lease,
        epoch=rt.epoch,
        metrics=TransferMetrics(rt.registry),
    )
    source.start_reaper()
    prefill = PrefillServicer(rt.engine, source, rt.metrics)
    engine_svc = EngineServicer(
        rt.engine, "prefill", rt.engine_id, rt.epoch, rt.model_name, lambda: len(source.leases)
    )
    kv_svc = KVServicer(source)  # sync handlers: they run on the server's thread pool

    rt.serve(
        args,
        {
            "splitserve.v1.PrefillService": lambda s: pb_grpc.add_PrefillServiceServicer_to_server(
                prefill, s
            ),
            "splitserve.v1.KVService": kv_svc.add_to_server,
            "splitserve.v1.EngineService": lambda s: pb_grpc.add_EngineServiceServicer_to_server(
                engine_svc, s
            ),
        },
        on_shutdown=source.close,
    )
    return 0
