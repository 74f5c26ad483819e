"""The async engine surface under cancellation and starvation, on a tiny model in-process.

Every way a caller can leave (cancelled while its request is being added, mid-prefill, after the
prompt finished but before anyone took its held blocks, mid-import) must leave the KV books
balanced; an engine that cannot make progress says so in ``health()`` and recovers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.engine.async_engine import AsyncEngine, FirstToken, PrefillOutput
from splitserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from splitserve.engine.engine_core import EngineCore
from splitserve.protocol.sampling import SamplingParams

PROMPT = list(range(100, 180))  # 80 tokens: 5 blocks of 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def make_engine(model_dir, num_blocks=64, stall=0.5, **sched) -> AsyncEngine:
    config = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(**sched),
    )
    return AsyncEngine(EngineCore(config), stall_seconds=stall).start()


async def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        busy = s.num_running or s.num_waiting or s.num_held
        if not busy and s.num_free_blocks == s.num_blocks:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"engine did not go back to idle: {engine.stats()}")


@pytest.fixture
def engine(tiny_llama_dir):
    eng = make_engine(tiny_llama_dir)
    yield eng
    eng.shutdown()


def test_cancelled_at_every_point_leaves_nothing_behind(engine):
    """Cancel generate/prefill at a spread of moments: blocks, holds and requests all go."""

    async def scenario() -> None:
        delays = [0.0, 0.001, 0.005, 0.02, 0.05, 0.1, 0.2]
        for i, delay in enumerate(delays):
            for kind in ("generate", "prefill"):
                rid = f"{kind}-{i}"
                params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
                if kind == "generate":
                    coro = _drain(engine.generate(rid, PROMPT * 3, params))
                else:
                    coro = engine.prefill(rid, PROMPT * 3, params)
                task = asyncio.create_task(coro)
                await asyncio.sleep(delay)
                task.cancel()
                (result,) = await asyncio.gather(task, return_exceptions=True)
                if isinstance(result, PrefillOutput):  # it won the race: its caller owns the hold
                    assert result.held_block_ids
                    await engine.release_kv(rid)
        await wait_idle(engine)
        assert engine.audit().unaccounted == 0

    asyncio.run(scenario())


def test_prefill_holds_until_released_and_n_samples_share_one_hold(engine):
    async def scenario() -> None:
        params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
        out = await engine.prefill("p", PROMPT, params)
        assert len(out.first_tokens) == 3 and not out.finished
        assert len(out.held_block_ids) == 5
        assert list(await engine.held_requests()) == ["p"]  # one hold for the three samples
        assert await engine.release_kv("p") == 5
        assert await engine.release_kv("p") == 0  # idempotent
        # A prefill whose every sample ends at once holds nothing.
        done = await engine.prefill("q", PROMPT, SamplingParams(max_tokens=1))
        assert done.finished and done.held_block_ids == ()
        await wait_idle(engine)

    asyncio.run(scenario())


def test_import_left_without_commit_gives_the_reservation_back(engine):
    async def scenario() -> None:
        async with engine.kv_import("i", PROMPT, GREEDY) as imp:
            assert imp.reservation is not None and len(imp.reservation.block_ids) == 5
        await wait_idle(engine)
        # Abandoning the stream of a committed import aborts it.
        async with engine.kv_import("j", PROMPT, GREEDY) as imp:
            stream = imp.recompute([FirstToken(7, None, None)])
            first = await stream.__anext__()
            assert first.token_ids == (7,)
            await stream.aclose()
        await wait_idle(engine)
        assert engine.audit().unaccounted == 0

    asyncio.run(scenario())


def test_starved_engine_reports_not_serving_then_recovers(tiny_llama_dir):
    """Holds fill the pool and a request waits with no step possible: health says why; once
    the holds go, the request runs and health is back."""
    engine = make_engine(tiny_llama_dir, num_blocks=12, max_num_seqs=4)
    try:

        async def scenario() -> None:
            # Distinct prompts: a prefix-cache hit would let the waiting request share blocks.
            prompts = [[t + 1000 * i for t in PROMPT] for i in range(3)]
            held = [await engine.prefill(f"h{i}", prompts[i], GREEDY) for i in range(2)]
            assert len({b for h in held for b in h.held_block_ids}) == 10
            waiting = asyncio.create_task(_drain(engine.generate("w", prompts[2], GREEDY)))
            deadline = time.monotonic() + 10
            while engine.health().serving:
                assert time.monotonic() < deadline, "health never reported the stall"
                await asyncio.sleep(0.05)
            assert "waiting" in engine.health().reason
            for h in held:
                await engine.release_kv(h.request_id)
            deltas = await asyncio.wait_for(waiting, 30)
            assert sum(len(d.token_ids) for d in deltas) == GREEDY.max_tokens
            assert engine.health().serving
            await wait_idle(engine)

        asyncio.run(scenario())
    finally:
        engine.shutdown()


async def _drain(agen) -> list:
    return [d async for d in agen]
