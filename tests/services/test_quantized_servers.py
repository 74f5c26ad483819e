"""A prefill server with quantized weights, as a real process: it says so in its KV compat facts,
and a decode server with other weights refuses its blocks at the handshake (naming the field)
and recomputes the prompt itself, so the request still completes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from splitserve import SamplingParams
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.wire import params_to_proto

pytestmark = pytest.mark.model
MAX_TOKENS = 8


def _info(server) -> pb.EngineInfo:
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.EngineServiceStub(channel).GetInfo(pb.EngineInfoRequest(), timeout=10)


def test_quantization_is_a_kv_compat_fact(pair):
    quantized, plain = _info(pair["prefill"]), _info(pair["decode"])
    assert quantized.kv_compat.quantization == "w8a8"
    assert plain.kv_compat.quantization == ""
    assert quantized.kv_compat_hash != plain.kv_compat_hash


async def _prefill_then_decode(prefill: str, decode: str, req: pb.PrefillRequest) -> list:
    async with grpc.aio.insecure_channel(prefill) as pch, grpc.aio.insecure_channel(decode) as dch:
        handoff = await pb_grpc.PrefillServiceStub(pch).Prefill(req, timeout=60)
        stream = pb_grpc.DecodeServiceStub(dch).Generate(
            pb.GenerateRequest(request=req, prefill=handoff), timeout=120
        )
        return [m async for m in stream]


def test_blocks_of_other_weights_are_refused_and_recomputed(pair):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    req = pb.PrefillRequest(
        request_id="q-1", prompt_token_ids=list(range(300, 340)),
        sampling_params=params_to_proto(params),
    )  # fmt: skip
    messages = asyncio.run(
        _prefill_then_decode(pair["prefill"].address, pair["decode"].address, req)
    )
    transfer = messages[0].kv_transfer
    assert transfer.recomputed
    assert "quantization" in transfer.failure_reason
    assert sum(len(m.token_ids) for m in messages) == MAX_TOKENS
    pair["decode"].wait_pool_full(timeout=10)
    pair["prefill"].wait_pool_full(timeout=10)
