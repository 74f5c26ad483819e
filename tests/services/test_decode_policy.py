"""The decode servicer's failure policies, in-process on a tiny model: a hand-off from a source
that cannot be reached is recomputed (same tokens) or fails the request with a clear error."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from splitserve import LLM, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.kvtransfer.puller import KVPuller
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.kv_compat import CompatInfo
from splitserve.protocol.wire import params_to_proto
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.decode.kv_connector import KVConnector
from splitserve.services.decode.server import DecodeServicer

PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks of 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32)


def make_servicer(llm, policy):
    core = llm.engine
    compat = CompatInfo(
        model="tiny", revision="", dtype="float32", block_size=16,
        num_layers=core.shape.num_layers, num_kv_heads=core.shape.num_kv_heads,
        head_dim=core.shape.head_dim,
    )  # fmt: skip
    puller = KVPuller(core.kv_cache, compat, "decode-test", transports=("grpc",))
    engine = AsyncEngine(core).start()
    metrics = EngineMetrics(CollectorRegistry(), engine, "tiny", "decode")
    connector = KVConnector(engine, puller, policy, transfer_timeout=2.0)
    return DecodeServicer(engine, connector, metrics)


def unreachable_handoff(puller: KVPuller, first_token: int) -> pb.PrefillResponse:
    handoff = pb.KVHandoff(
        protocol_version=pb.PROTOCOL_VERSION,
        request_id="r",
        engine_id="gone",
        epoch=1,
        lease_id="r:1",
        block_ids=[4, 9, 2],
        num_tokens=len(PROMPT),
        block_size=16,
        compat_hash=puller.compat_hash,
        block_checksums=[1, 2, 3],
        endpoints=pb.TransportEndpoints(grpc_address="127.0.0.1:9", transports=["grpc"]),
    )
    return pb.PrefillResponse(
        handoff=handoff,
        first_tokens=[pb.FirstToken(token_id=first_token)],
        num_prompt_tokens=len(PROMPT),
    )


async def generate(servicer, prefill):
    req = pb.PrefillRequest(
        request_id="r", prompt_token_ids=PROMPT, sampling_params=params_to_proto(PARAMS)
    )
    call = pb.GenerateRequest(request=req, prefill=prefill)
    return [m async for m in servicer.Generate(call, context=None)]


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_unreachable_source(llm, policy):
    expected = llm.generate([PROMPT], PARAMS)[0].outputs[0].token_ids
    servicer = make_servicer(llm, policy)
    try:
        puller = servicer.connector.puller
        prefill = unreachable_handoff(puller, expected[0])
        messages = asyncio.run(asyncio.wait_for(generate(servicer, prefill), timeout=30))
    finally:
        servicer.engine.shutdown()
        puller.close()
    if policy == "recompute":
        assert [t for m in messages for t in m.token_ids] == expected
        assert messages[0].kv_transfer.recomputed
        assert "unreachable" in messages[0].kv_transfer.failure_reason
        assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    else:
        assert len(messages) == 1
        assert messages[0].finish_reason == pb.FINISH_REASON_ERROR
        assert "KV transfer failed" in messages[0].error and "fail" in messages[0].error
    llm.engine.check_integrity()
    assert llm.engine.kv.pool.num_free_blocks == 32
