"""Random protobuf messages against the real prefill and decode servicers (in-process, tiny model).

proto3 lets a peer send any value of each field's type. Whatever arrives (random field values,
or random bytes that happen to parse), a call must end within a bound, either answered or
refused with INVALID_ARGUMENT (or the statuses the servers use for protocol and load: never a
crash, a hang or an engine that stops serving), and the engine must end idle with its books
balanced. Bounded example counts so it runs in the normal suite.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import CacheConfig, EngineConfig
from splitserve.engine.engine_core import EngineCore
from splitserve.kvtransfer.puller import KVPuller
from splitserve.kvtransfer.source import KVBlockSource, SourceConfig
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.kv_compat import CompatInfo
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.decode.kv_connector import KVConnector
from splitserve.services.decode.server import DecodeServicer
from splitserve.services.prefill.server import PrefillServicer

CALL_TIMEOUT_S = 30.0
# What a refusal may say: bad input, or the protocol / load statuses the servers use.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Context:
    """The slice of a grpc.aio servicer context the servers use: abort raises, as grpc's does."""

    async def abort(self, code, details):
        raise Aborted(code, details)


class Rig:
    """One tiny engine with a prefill and a (colocated) decode servicer over it, on one loop."""

    def __init__(self, model_dir) -> None:
        config = EngineConfig(
            model=str(model_dir), dtype="float32", cache=CacheConfig(num_blocks=64)
        )
        self.engine = AsyncEngine(EngineCore(config)).start()
        f = self.engine.facts
        compat = CompatInfo("tiny", "", f.kv_dtype, f.block_size, f.num_layers, f.num_kv_heads,
                            f.head_dim)  # fmt: skip
        self.source = KVBlockSource(
            self.engine.kv_cache,
            SourceConfig("prefill-0", compat, "127.0.0.1:1", transports=("grpc",),
                         lease_seconds=5),
            lambda lease: self.engine.release_kv_soon(lease.request_id),
        )  # fmt: skip
        metrics = EngineMetrics(CollectorRegistry(), self.engine, "tiny", "decode")
        self.prefill = PrefillServicer(self.engine, self.source, metrics, orphan_grace_s=0.2)
        puller = KVPuller(self.engine.kv_cache, compat, "decode-0", transports=("grpc",))
        connector = KVConnector(self.engine, puller, "recompute", transfer_timeout=0.5)
        self.decode = DecodeServicer(self.engine, connector, metrics, colocated=True)
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, CALL_TIMEOUT_S))

    def close(self) -> None:
        self.source.close()
        self.engine.shutdown()
        self.loop.close()


@pytest.fixture(scope="module")
def rig(tiny_llama_dir):
    r = Rig(tiny_llama_dir)
    yield r
    r.close()


# ---- strategies: each field mostly plausible (so calls get deep), sometimes anything ----------


def mostly(plausible: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """``plausible`` four times in five, else ``wild``."""
    return st.one_of(plausible, plausible, plausible, plausible, wild)


U32 = st.integers(0, 2**32 - 1)
TOKEN = mostly(st.integers(0, 200), U32)
FLOAT32 = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=20)


def tokens(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy:
    """Token id lists: mostly all in the vocabulary, else any uint32s (an empty list too)."""
    return mostly(st.lists(st.integers(0, 200), min_size=min_size, max_size=max_size),
                  st.lists(U32, max_size=max_size))  # fmt: skip


@st.composite
def sampling(draw) -> pb.SamplingParams:
    msg = pb.SamplingParams()
    wild = draw(st.integers(0, 4)) == 0  # one in five messages has wild values anywhere
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):  # fmt: skip
        if draw(st.integers(0, 3)) == 0:
            setattr(msg, name, draw(FLOAT32 if wild else st.floats(0.25, 1.0, width=32)))
    msg.n = draw(st.one_of(st.integers(1, 3), U32) if wild else st.integers(1, 3))
    if draw(st.booleans()):
        msg.top_k = draw(st.integers(-(2**31), 2**31 - 1) if wild else st.integers(0, 50))
    if draw(st.booleans()):
        msg.seed = draw(st.integers(-(2**63), 2**63 - 1))
    msg.max_tokens = draw(mostly(st.integers(1, 4), U32) if wild else st.integers(1, 4))
    if draw(st.integers(0, 3)) == 0:
        msg.min_tokens = draw(mostly(st.integers(0, 2), U32))
    for name in ("logprobs", "prompt_logprobs"):
        if draw(st.integers(0, 3)) == 0:
            setattr(msg, name, draw(mostly(st.integers(0, 3), U32)))
    for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        setattr(msg, name, draw(st.booleans()))
    # max_tokens_unbounded stays unset: a valid one would generate to the model length.
    msg.stop.extend(draw(st.lists(mostly(st.text(min_size=1, max_size=5), TEXT), max_size=2)))
    msg.stop_token_ids.extend(draw(tokens(max_size=2)))
    for t, b in draw(st.dictionaries(TOKEN, mostly(st.floats(-5, 5), FLOAT32), max_size=2)).items():
        msg.logit_bias[t] = b
    msg.allowed_token_ids.extend(draw(tokens(max_size=3)))
    kinds = [None, None, None, "json_schema", "json_object", "regex", "choice", "grammar"]
    kind = draw(st.sampled_from(kinds))
    plausible = {"json_schema": '{"type": "object"}', "regex": "[ab]+", "grammar": 'root ::= "a"'}
    if kind == "json_object":
        msg.structured_output.json_object = draw(st.booleans())
    elif kind == "choice":
        msg.structured_output.choice.values.extend(draw(st.lists(TEXT, max_size=3)))
    elif kind is not None:
        setattr(msg.structured_output, kind, draw(mostly(st.just(plausible[kind]), TEXT)))
    return msg


@st.composite
def prefill_request(draw) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        request_id=draw(mostly(st.uuids().map(str), st.text(max_size=300))),
        prompt_token_ids=draw(tokens(min_size=1, max_size=40)),
        sampling_params=draw(sampling()),
        extra_keys=draw(st.lists(TEXT, max_size=2)),
        protocol_version=draw(mostly(st.sampled_from([0, pb.PROTOCOL_VERSION]), U32)),
    )  # fmt: skip


@st.composite
def generate_request(draw) -> pb.GenerateRequest:
    req = draw(prefill_request())
    msg = pb.GenerateRequest(
        request=req, protocol_version=draw(mostly(st.just(pb.PROTOCOL_VERSION), U32))
    )
    if draw(st.booleans()):  # a hand-off (from no real pod: the pull fails, then recompute)
        n = req.sampling_params.n
        count = draw(mostly(st.just(n), st.integers(0, 4)))
        first = [
            pb.FirstToken(
                token_id=draw(TOKEN),
                finish_reason=draw(mostly(st.just(0), st.integers(-(2**31), 2**31 - 1))),
            )
            for _ in range(min(count, 8))
        ]
        blocks = -(-len(req.prompt_token_ids) // 16)
        ids = draw(mostly(st.lists(st.integers(0, 63), min_size=blocks, max_size=blocks),
                          st.lists(U32, max_size=6)))  # fmt: skip
        handoff = pb.KVHandoff(
            protocol_version=draw(mostly(st.just(pb.PROTOCOL_VERSION), U32)),
            request_id=req.request_id,
            engine_id="fuzz",
            epoch=draw(st.integers(0, 2**64 - 1)),
            lease_id=draw(TEXT),
            block_ids=ids,
            num_tokens=draw(mostly(st.just(len(req.prompt_token_ids)), U32)),
            block_size=draw(mostly(st.just(16), U32)),
            block_checksums=draw(mostly(st.just([1] * len(ids)),
                                        st.lists(st.integers(0, 2**64 - 1), max_size=6))),
            endpoints=pb.TransportEndpoints(grpc_address="127.0.0.1:9", transports=["grpc"]),
        )  # fmt: skip
        msg.prefill.CopyFrom(pb.PrefillResponse(first_tokens=first, handoff=handoff))
    return msg


def _random_bytes_as(kind):
    """Random bytes that happen to parse as ``kind`` (most random bytes do, as proto3 skips
    unknown fields)."""

    def parse(data: bytes):
        msg = kind()
        try:
            msg.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a DecodeError: grpc itself refuses those
            return None
        return msg

    return st.binary(max_size=200).map(parse).filter(lambda m: m is not None)


# ---- the properties -----------------------------------------------------------------------------

_FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def _call_prefill(rig: Rig, msg: pb.PrefillRequest) -> None:
    try:
        rig.run(rig.prefill.Prefill(msg, Context()))
    except Aborted as err:
        assert err.code in ALLOWED and err.details, err
    finally:
        rig.run(rig.prefill.Abort(pb.AbortRequest(request_ids=[msg.request_id]), Context()))


def _call_generate(rig: Rig, msg: pb.GenerateRequest) -> None:
    async def drain() -> int:
        return len([m async for m in rig.decode.Generate(msg, Context())])

    try:
        rig.run(drain())
    except Aborted as err:
        assert err.code in ALLOWED and err.details, err


def _healthy(rig: Rig) -> None:
    assert rig.engine.error is None, rig.engine.error
    assert rig.engine.health().serving
    deadline = time.monotonic() + 10
    while True:
        s = rig.engine.stats()
        if not (s.num_running or s.num_waiting) and rig.engine.audit().unaccounted == 0:
            return
        assert time.monotonic() < deadline, (s, rig.engine.audit())
        rig.run(asyncio.sleep(0.05))


@_FUZZ
@given(msg=st.one_of(prefill_request(), _random_bytes_as(pb.PrefillRequest)))
def test_prefill_refuses_or_serves_any_message(rig, msg):
    _call_prefill(rig, msg)
    _healthy(rig)


@_FUZZ
@given(msg=st.one_of(generate_request(), _random_bytes_as(pb.GenerateRequest)))
def test_generate_refuses_or_serves_any_message(rig, msg):
    _call_generate(rig, msg)
    _healthy(rig)


def test_a_request_id_whose_blocks_are_leased_is_refused_not_fatal(rig):
    """A second Prefill under the id of one whose blocks are still leased: ALREADY_EXISTS, and
    the engine keeps serving (the engine would fail on holding two sets under one id)."""
    msg = pb.PrefillRequest(
        request_id="dup", prompt_token_ids=list(range(100, 140)),
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=4),
    )  # fmt: skip
    first = rig.run(rig.prefill.Prefill(msg, Context()))
    assert first.HasField("handoff")
    with pytest.raises(Aborted) as info:
        rig.run(rig.prefill.Prefill(msg, Context()))
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    rig.run(rig.prefill.Abort(pb.AbortRequest(request_ids=["dup"]), Context()))
    _healthy(rig)


# ---- over a real gRPC server: bytes that are no message -------------------------------------


@pytest.fixture(scope="module")
def grpc_server(rig):
    """The rig's servicers behind a real grpc.aio server with ``MalformedMessageInterceptor``."""
    from splitserve.proto import splitserve_pb2_grpc as pb_grpc
    from splitserve.protocol.request_checks import MalformedMessageInterceptor

    async def start():
        server = grpc.aio.server(interceptors=[MalformedMessageInterceptor()])
        pb_grpc.add_PrefillServiceServicer_to_server(rig.prefill, server)
        pb_grpc.add_DecodeServiceServicer_to_server(rig.decode, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    server, channel = rig.run(start())
    yield channel
    rig.run(channel.close())
    rig.run(server.stop(None))


@_FUZZ
@given(
    data=st.one_of(st.binary(max_size=64), prefill_request().map(lambda m: m.SerializeToString()))
)
def test_the_servers_answer_any_bytes_with_a_status(rig, grpc_server, data):
    def raw(method: str, stream: bool):
        kind = grpc_server.unary_stream if stream else grpc_server.unary_unary
        return kind(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    async def call() -> None:
        for method, stream in (("/splitserve.v1.PrefillService/Prefill", False),
                               ("/splitserve.v1.DecodeService/Generate", True)):  # fmt: skip
            try:
                c = raw(method, stream)(data, timeout=CALL_TIMEOUT_S)
                if stream:
                    async for _ in c:
                        pass
                else:
                    await c
            except grpc.aio.AioRpcError as err:
                assert err.code() in ALLOWED and err.details(), (method, err.code(), err.details())
        rid = pb.PrefillRequest()
        try:
            rid.ParseFromString(data)
        except Exception:  # noqa: BLE001
            return
        await rig.prefill.Abort(pb.AbortRequest(request_ids=[rid.request_id]), Context())

    rig.run(call())
    _healthy(rig)
