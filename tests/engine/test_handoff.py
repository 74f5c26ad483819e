"""The engine's hand-off API without a network: prefill on engine A (blocks held), copy the blocks
into engine B's reservation, continue there. Output must equal one engine's, greedy and seeded,
for one sample and for n samples forked from one imported prompt."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams

PROMPTS = [list(range(100, 140)), list(range(1000, 1003)), [9] * 33]


def prefill_on(a, rid: str, prompt: list[int], params: SamplingParams):
    """Run the prompt on engine ``a`` to each sample's first token, holding its blocks."""
    first_params = SamplingParams(**{**params.__dict__, "max_tokens": 1, "min_tokens": 0})
    a.add_request(rid, prompt, first_params, hold_kv=True)
    deltas = []
    while a.has_unfinished():
        deltas += a.step()
    assert sorted(d.index for d in deltas) == list(range(params.n))
    held = next(d.held_block_ids for d in deltas if d.held_block_ids)
    assert len(held) == -(-len(prompt) // a.kv.block_size)
    first = [(d.token_ids[0], None) for d in sorted(deltas, key=lambda d: d.index)]
    return held, first


def run_split(prefill: LLM, decode: LLM, rid: str, prompt: list[int], params: SamplingParams):
    """Sample i's token ids, prefilled on one engine and decoded on the other."""
    a, b = prefill.engine, decode.engine
    held, first = prefill_on(a, rid, prompt, params)
    reservation = b.reserve_import(rid, prompt, params)
    assert reservation is not None
    src = held[reservation.first_block :]
    for s, d in zip(src, reservation.block_ids, strict=True):
        b.kv_cache[d].copy_(a.kv_cache[s])
    assert a.release_kv(rid) == len(held)
    out = b.commit_import(rid, first)
    while b.has_unfinished():
        out += b.step()
    return [[t for d in out if d.index == i for t in d.token_ids] for i in range(params.n)]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "n3-seeded"],
)
def test_split_equals_single_engine(tiny_llama_dir, params):
    single = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    expected = [[c.token_ids for c in o.outputs] for o in single.generate(PROMPTS, params)]
    prefill = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    decode = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    for i, prompt in enumerate(PROMPTS):
        assert run_split(prefill, decode, f"r{i}", prompt, params) == expected[i]
    for llm in (prefill, decode):
        llm.engine.check_integrity()
        assert llm.engine.kv.pool.num_free_blocks == 64


@pytest.mark.parametrize("n", [1, 3])
def test_recompute_import_keeps_first_tokens_and_output(tiny_llama_dir, n):
    params = SamplingParams(n=n, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    expected = [c.token_ids for c in llm.generate([PROMPTS[0]], params)[0].outputs]
    engine = llm.engine
    assert engine.reserve_import("x", PROMPTS[0], params) is not None
    out = engine.recompute_import("x", PROMPTS[0], params, [(e[0], None) for e in expected])
    while engine.has_unfinished():
        out += engine.step()
    got = [[t for d in out if d.index == i for t in d.token_ids] for i in range(n)]
    assert got == expected
    engine.check_integrity()


def test_abort_frees_blocks_held_for_a_hand_off(tiny_llama_dir):
    """A prefill whose requester left after the prompt finished: abort gives the hold back."""
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    engine = llm.engine
    held, _ = prefill_on(engine, "gone", PROMPTS[0], SamplingParams(max_tokens=5))
    assert engine.kv.pool.num_free_blocks == 64 - len(held)
    assert engine.abort_request("gone") is True
    assert engine.abort_request("gone") is False  # idempotent
    assert engine.kv.pool.num_free_blocks == 64 and engine.audit().unaccounted == 0
    engine.check_integrity()


def test_queue_timeout_drops_only_requests_that_never_ran(tiny_llama_dir):
    from splitserve.engine.config import EngineConfig, SchedulerConfig
    from splitserve.engine.engine_core import EngineCore

    config = EngineConfig(
        model=str(tiny_llama_dir), dtype="float32",
        scheduler=SchedulerConfig(max_num_seqs=1, max_queue_seconds=0.05),
    )  # fmt: skip
    engine = EngineCore(config)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("running", PROMPTS[0], params)
    engine.step()  # "running" is admitted; the slot is taken
    engine.add_request("waits", PROMPTS[1], params)
    import time

    time.sleep(0.1)
    deltas = engine.step()
    dropped = [d for d in deltas if d.error]
    assert [d.request_id for d in dropped] == ["waits"] and dropped[0].finish_reason == "abort"
    assert "waited" in dropped[0].error
    while engine.has_unfinished():  # the running request is never dropped
        deltas += engine.step()
    assert sum(len(d.token_ids) for d in deltas if d.request_id == "running") == 29
    engine.check_integrity()
