"""`splitserve decode`: the decode gRPC server (``--colocated``: prefill and decode in one pod)."""

from __future__ import annotations

import argparse

from splitserve.services.common.engine_args import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, default_port=50051)
    parser.add_argument("--kv-failure-policy", default="recompute", choices=["recompute", "fail"])
    parser.add_argument("--kv-transfer-timeout", type=float, default=10.0)
    parser.add_argument("--colocated", action="store_true", help="also run prompts locally")


def run(args: argparse.Namespace) -> int:
    from splitserve.kvtransfer.metrics import TransferMetrics
    from splitserve.kvtransfer.puller import KVPuller
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.services.common.engine_service import EngineServicer
    from splitserve.services.common.runtime import build_runtime, kv_transports
    from splitserve.services.decode.server import DecodeServicer

    rt = build_runtime(args, "decode")
    puller = KVPuller(
        rt.engine.core.kv_cache,
        rt.compat,
        args.engine_id,
        transports=kv_transports(args),
        metrics=TransferMetrics(rt.registry),
    )
    decode = DecodeServicer(
        rt.engine,
        puller,
        rt.metrics,
        failure_policy=args.kv_failure_policy,
        colocated=args.colocated,
        transfer_timeout=args.kv_transfer_timeout,
    )
    engine_svc = EngineServicer(rt.engine, "decode", rt.engine_id, rt.epoch, rt.model_name)
    rt.serve(
        args,
        {
            "splitserve.v1.DecodeService": lambda s: pb_grpc.add_DecodeServiceServicer_to_server(
                decode, s
            ),
            "splitserve.v1.EngineService": lambda s: pb_grpc.add_EngineServiceServicer_to_server(
                engine_svc, s
            ),
        },
        on_shutdown=puller.close,
    )
    return 0
