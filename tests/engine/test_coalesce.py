"""A stream consumer that fell behind gets its waiting deltas merged per sample: the same
tokens, text and logprobs in fewer messages (``coalesce_deltas``), end to end through
``AsyncEngine``."""

from __future__ import annotations

import asyncio

from splitserve import LLM, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.outputs import SequenceDelta, coalesce_deltas
from splitserve.protocol.logprobs import TokenLogprobs


def _d(index: int, tokens: tuple[int, ...], text: str, finish: str | None = None, **kw):
    lps = tuple(TokenLogprobs(token_id=t, logprob=-1.0, rank=1, top=()) for t in tokens)
    return SequenceDelta("r", index, tokens, text, lps, finish_reason=finish, **kw)


def test_coalesce_merges_each_sample_in_order_and_keeps_the_finish():
    deltas = [_d(0, (1,), "a"), _d(1, (7,), "x"), _d(0, (2, 3), "bc"),
              _d(1, (8,), "y", "stop", stop_reason="y"), _d(0, (4,), "d", "length")]  # fmt: skip
    merged = coalesce_deltas(deltas)
    assert [(d.index, d.token_ids, d.text, d.finish_reason) for d in merged] == [
        (0, (1, 2, 3, 4), "abcd", "length"),
        (1, (7, 8), "xy", "stop"),
    ]
    assert [lp.token_id for lp in merged[0].logprobs] == [1, 2, 3, 4]
    assert merged[1].stop_reason == "y"
    # nothing to merge, or a drop among them: unchanged
    assert coalesce_deltas(deltas[:2]) == deltas[:2]
    drop = SequenceDelta("r", 0, (), "", None, finish_reason="abort", error="overloaded")
    assert coalesce_deltas([deltas[0], drop]) == [deltas[0], drop]


def test_a_slow_consumer_gets_fewer_messages_with_the_same_output(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = (
        LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
        .generate([[5, 6, 7]], params)[0]
        .outputs[0]
    )
    engine = AsyncEngine(LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64).engine)
    engine.start()

    async def consume() -> list[SequenceDelta]:
        out = []
        async for delta in engine.generate("slow", [5, 6, 7], params):
            out.append(delta)
            await asyncio.sleep(0.05)  # far slower than a tiny model's step
        return out

    try:
        deltas = asyncio.run(consume())
    finally:
        engine.shutdown()
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert len(deltas) < len(expected.token_ids)
    assert deltas[-1].finish_reason == "length"
