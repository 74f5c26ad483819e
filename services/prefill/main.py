"""`splitserve prefill`: the prefill gRPC server."""

from __future__ import annotations

import argparse

from splitserve.services.common.engine_args import add_engine_arguments, advertised_address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--lease-seconds", type=float, default=30.0)


def run(args: argparse.Namespace) -> int:
    from splitserve.kvtransfer.leases import Lease
    from splitserve.kvtransfer.metrics import TransferMetrics
    from splitserve.kvtransfer.servicer import KVServicer
    from splitserve.kvtransfer.source import KVBlockSource, SourceConfig
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.protocol import constants as C
    from splitserve.services.common.engine_service import EngineServicer
    from splitserve.services.common.runtime import build_runtime, kv_transports
    from splitserve.services.prefill.server import PrefillServicer

    rt = build_runtime(args, "prefill")
    engine = rt.engine

    def end_lease(lease: Lease) -> None:
        # Called from gRPC / reaper threads: the engine thread frees the request's held blocks.
        engine.release_kv_soon(lease.request_id)

    source = KVBlockSource(
        engine.kv_cache,
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
    prefill = PrefillServicer(engine, source, rt.metrics, drain=rt.drain)
    engine_svc = EngineServicer(engine, rt.info, lambda: len(source.leases), drain=rt.drain)
    kv_svc = KVServicer(source)  # sync handlers: they run on the server's thread pool
    rt.serve(
        args,
        {
            C.PREFILL_SERVICE: lambda s: pb_grpc.add_PrefillServiceServicer_to_server(prefill, s),
            C.KV_SERVICE: kv_svc.add_to_server,
            C.ENGINE_SERVICE: lambda s: pb_grpc.add_EngineServiceServicer_to_server(engine_svc, s),
        },
        on_shutdown=source.close,
        background=[prefill.reap_orphans],
        # Draining ends when no prompt runs and every lease was pulled (released) or expired:
        # decode pods read the blocks of their hand-offs from here until then.
        idle=prefill.idle,
    )
    return 0
