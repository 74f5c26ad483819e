"""Who frees a prefill's blocks, in-process on a tiny model: the lease (released or aborted), the
servicer when its caller left before the lease was granted, and the orphan reaper as a last
resort. After every scenario the engine is back to idle with its books balanced."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import CacheConfig, EngineConfig
from splitserve.engine.engine_core import EngineCore
from splitserve.kvtransfer.source import KVBlockSource, SourceConfig
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.kv_compat import CompatInfo
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import params_to_proto
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.prefill.server import PrefillServicer

PROMPT = list(range(100, 180))  # 5 blocks of 16


class Context:
    """The slice of a grpc.aio context the servicer uses."""

    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


@pytest.fixture
def prefill(tiny_llama_dir):
    config = EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", cache=CacheConfig(num_blocks=64)
    )
    engine = AsyncEngine(EngineCore(config)).start()
    f = engine.facts
    compat = CompatInfo("tiny", "", f.kv_dtype, f.block_size, f.num_layers, f.num_kv_heads,
                        f.head_dim)  # fmt: skip
    source = KVBlockSource(
        engine.kv_cache,
        SourceConfig("prefill-0", compat, "127.0.0.1:1", transports=("grpc",), lease_seconds=60),
        lambda lease: engine.release_kv_soon(lease.request_id),
    )
    metrics = EngineMetrics(CollectorRegistry(), engine, "tiny", "prefill")
    servicer = PrefillServicer(engine, source, metrics, orphan_grace_s=0.2)
    yield servicer
    source.close()
    engine.shutdown()


def request(rid: str, **params) -> pb.PrefillRequest:
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **params})
    return pb.PrefillRequest(
        request_id=rid, prompt_token_ids=PROMPT, sampling_params=params_to_proto(sp)
    )


async def idle(servicer: PrefillServicer, timeout: float = 10.0) -> None:
    engine = servicer.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        busy = s.num_running or s.num_waiting or s.num_held or len(servicer.source.leases)
        if not busy and s.num_free_blocks == s.num_blocks:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not idle: {engine.stats()}, {len(servicer.source.leases)} leases")


def test_abort_releases_the_lease_of_an_answered_prefill(prefill):
    async def scenario() -> None:
        response = await prefill.Prefill(request("a", n=2, temperature=1.0, seed=3), Context())
        assert len(response.first_tokens) == 2 and response.handoff.lease_id
        assert len(response.handoff.block_ids) == 5
        reply = await prefill.Abort(pb.AbortRequest(request_ids=["a"]), Context())
        assert reply.num_aborted == 1
        await idle(prefill)
        again = await prefill.Abort(pb.AbortRequest(request_ids=["a"]), Context())
        assert again.num_aborted == 0

    asyncio.run(scenario())


def test_a_caller_gone_at_any_moment_frees_everything(prefill):
    async def scenario() -> None:
        for i, delay in enumerate([0.0, 0.002, 0.01, 0.03, 0.08, 0.15, 0.3, 0.6]):
            task = asyncio.create_task(prefill.Prefill(request(f"c{i}"), Context()))
            await asyncio.sleep(delay)
            task.cancel()
            (result,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(result, pb.PrefillResponse):  # answered first: the router's Abort
                await prefill.Abort(pb.AbortRequest(request_ids=[f"c{i}"]), Context())
        await idle(prefill)
        assert prefill.engine.audit().unaccounted == 0

    asyncio.run(scenario())


def test_the_orphan_reaper_reclaims_holds_nobody_owns(prefill):
    async def scenario() -> None:
        engine = prefill.engine
        # A hold with no lease and no Prefill answering for it: what a bug would leave.
        out = await engine.prefill("orphan", PROMPT, SamplingParams(max_tokens=8))
        assert out.held_block_ids
        leased = await prefill.Prefill(request("leased"), Context())  # a live lease: kept
        assert await prefill._reap_once() == 0  # too young yet
        await asyncio.sleep(0.3)
        assert await prefill._reap_once() == len(out.held_block_ids)
        assert engine.stats().num_held == 1  # the leased one stays
        counted = prefill.metrics.blocks_reclaimed._value.get()
        assert counted == len(out.held_block_ids)
        await prefill.Abort(pb.AbortRequest(request_ids=[leased.handoff.request_id]), Context())
        await idle(prefill)

    asyncio.run(scenario())
