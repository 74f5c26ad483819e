"""The engine's hand-off API without a network: prefill on engine A (blocks held), copy the blocks
into engine B's reservation, continue there. Output must equal one engine's, greedy and seeded."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams

PROMPTS = [list(range(100, 140)), list(range(1000, 1003)), [9] * 33]


def run_split(prefill: LLM, decode: LLM, rid: str, prompt: list[int], params: SamplingParams):
    a, b = prefill.engine, decode.engine
    first_params = SamplingParams(**{**params.__dict__, "max_tokens": 1, "min_tokens": 0})
    a.add_request(rid, prompt, first_params, hold_kv=True)
    deltas = []
    while a.has_unfinished():
        deltas += a.step()
    (first,) = deltas
    held = first.held_block_ids
    assert held and len(held) == -(-len(prompt) // a.kv.block_size)
    reservation = b.reserve_import(rid, prompt, params)
    assert reservation is not None
    src = held[reservation.first_block :]
    for s, d in zip(src, reservation.block_ids, strict=True):
        b.kv_cache[d].copy_(a.kv_cache[s])
    assert a.release_kv(rid) == len(held)
    out = [b.commit_import(rid, first.token_ids[0], None)]
    while b.has_unfinished():
        out += b.step()
    return [t for d in out for t in d.token_ids]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_split_equals_single_engine(tiny_llama_dir, params):
    single = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    expected = [o.outputs[0].token_ids for o in single.generate(PROMPTS, params)]
    prefill = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    decode = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    for i, prompt in enumerate(PROMPTS):
        assert run_split(prefill, decode, f"r{i}", prompt, params) == expected[i]
    for llm in (prefill, decode):
        llm.engine.check_integrity()
        assert llm.engine.kv.pool.num_free_blocks == 64


def test_recompute_import_keeps_first_token_and_output(tiny_llama_dir):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)
    expected = llm.generate([PROMPTS[0]], params)[0].outputs[0].token_ids
    engine = llm.engine
    assert engine.reserve_import("x", PROMPTS[0], params) is not None
    out = [engine.recompute_import("x", PROMPTS[0], params, expected[0])]
    while engine.has_unfinished():
        out += engine.step()
    assert [t for d in out for t in d.token_ids] == expected
    engine.check_integrity()
