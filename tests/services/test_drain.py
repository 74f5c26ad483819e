"""A prefill pod told to stop (SIGTERM) keeps serving the KV blocks it has leased.

Real processes: a prefill server runs a prompt and leases its blocks; then it gets SIGTERM. It
must answer health NOT_SERVING and refuse new prompts (UNAVAILABLE: the router retries those
elsewhere), yet let the decode pod pull the leased blocks (no recompute), and exit by itself,
cleanly, once the lease is released.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve import LLM, SamplingParams
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.wire import params_to_proto

from .conftest import Server

pytestmark = pytest.mark.model

MAX_TOKENS = 12


@pytest.fixture
def pair(tmp_path):
    # A lease far longer than the test: the prefill pod can only exit early by its release.
    prefill = Server("prefill", ["--lease-seconds", "600", "--drain-seconds", "600"],
                     tmp_path / "p.log")  # fmt: skip
    decode = Server("decode", ["--kv-transport", "grpc"], tmp_path / "d.log")
    for s in (prefill, decode):
        s.launch()
    try:
        for s in (prefill, decode):
            s.wait_ready(180)
        yield prefill, decode
    finally:
        for s in (prefill, decode):
            s.stop()


def _request(rid: str, ids: list[int]) -> pb.PrefillRequest:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    return pb.PrefillRequest(
        request_id=rid, prompt_token_ids=ids, sampling_params=params_to_proto(params)
    )


def test_a_draining_prefill_pod_serves_its_leases_then_exits(pair):
    prefill, decode = pair
    llm = LLM(dtype="float32", num_kv_blocks=64)
    prompt = " ".join(["Draining keeps leased KV blocks readable."] * 4)
    ids = llm.tokenizer.encode(prompt)
    (expected,) = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    )

    async def scenario() -> tuple[list[int], pb.KVTransferInfo]:
        async with (
            grpc.aio.insecure_channel(prefill.address) as pch,
            grpc.aio.insecure_channel(decode.address) as dch,
        ):
            req = _request("leased-1", ids)
            handed = await pb_grpc.PrefillServiceStub(pch).Prefill(req, timeout=60)
            assert handed.handoff.block_ids, "nothing was leased"
            prefill.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(pch)
            for _ in range(100):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the prefill pod still says SERVING after SIGTERM")
            stats = await pb_grpc.EngineServiceStub(pch).GetStats(pb.StatsRequest(), timeout=5)
            assert not stats.serving and stats.health_reason == "draining"
            assert stats.num_active_leases == 1
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.PrefillServiceStub(pch).Prefill(_request("new", ids), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in refused.value.details()
            # The decode pod pulls the leased blocks from the draining pod.
            messages = [
                m
                async for m in pb_grpc.DecodeServiceStub(dch).Generate(
                    pb.GenerateRequest(request=req, prefill=handed), timeout=120
                )
            ]
        return [t for m in messages for t in m.token_ids], messages[0].kv_transfer

    tokens, transfer = asyncio.run(scenario())
    assert transfer.transport == "grpc" and transfer.num_blocks > 0
    assert not transfer.recomputed, transfer.failure_reason
    assert tokens == list(expected.outputs[0].token_ids)
    # Its last lease released, nothing is left: it exits by itself, cleanly.
    assert prefill.proc.wait(60) == 0
    log = prefill.log_path.read_text()
    assert "drained in" in log and "drain ended after" not in log


class _Context:
    """The slice of a grpc.aio context ``refuse_if_draining`` uses."""

    async def abort(self, code, details):
        raise RuntimeError(f"{code.name}: {details}")


async def test_drain_waits_for_tracked_calls_and_idle_up_to_its_deadline() -> None:
    from splitserve.services.common.drain import Drain

    drain = Drain()
    await drain.refuse_if_draining(_Context())  # not draining: nothing happens
    leases = [1]
    with drain.track():
        drain.begin()
        with pytest.raises(RuntimeError, match="UNAVAILABLE: draining"):
            await drain.refuse_if_draining(_Context())
        assert drain.refused == 1
        # A call in flight: the deadline comes first.
        assert await drain.wait(0.2, idle=lambda: not leases) is False
    # No call left, but a lease: still not drained ...
    assert await drain.wait(0.2, idle=lambda: not leases) is False
    leases.clear()
    # ... until it goes.
    assert await drain.wait(5.0, idle=lambda: not leases) is True
    # A second signal ends the wait at once.
    with drain.track():
        drain.wake()
        assert await drain.wait(600.0) is False
