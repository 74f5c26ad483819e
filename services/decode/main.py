"""`splitserve decode`: the decode gRPC server (``--colocated``: prefill and decode in one pod)."""

from __future__ import annotations

import argparse

from splitserve.protocol.constants import KV_FAILURE_POLICIES
from splitserve.services.common.engine_args import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--kv-failure-policy", default="recompute", choices=KV_FAILURE_POLICIES)
    parser.add_argument("--kv-transfer-timeout", type=float, default=10.0)
    parser.add_argument("--colocated", action="store_true", help="also run prompts locally")


def run(args: argparse.Namespace) -> int:
    from splitserve.kvtransfer.metrics import TransferMetrics
    from splitserve.kvtransfer.puller import KVPuller
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.protocol import constants as C
    from splitserve.services.common.engine_service import EngineServicer
    from splitserve.services.common.runtime import build_runtime, kv_transports
    from splitserve.services.decode.kv_connector import KVConnector
    from splitserve.services.decode.server import DecodeServicer

    rt = build_runtime(args, "decode")
    puller = KVPuller(
        rt.engine.kv_cache,
        rt.compat,
        args.engine_id,
        transports=kv_transports(args),
        metrics=TransferMetrics(rt.registry),
    )
    connector = KVConnector(
        rt.engine, puller, args.kv_failure_policy, transfer_timeout=args.kv_transfer_timeout
    )
    decode = DecodeServicer(
        rt.engine, connector, rt.metrics, colocated=args.colocated, drain=rt.drain
    )
    engine_svc = EngineServicer(rt.engine, rt.info, drain=rt.drain)
    rt.serve(
        args,
        {
            C.DECODE_SERVICE: lambda s: pb_grpc.add_DecodeServiceServicer_to_server(decode, s),
            C.ENGINE_SERVICE: lambda s: pb_grpc.add_EngineServiceServicer_to_server(engine_svc, s),
        },
        on_shutdown=puller.close,
    )
    return 0
