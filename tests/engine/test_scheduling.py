"""Prefix caching, preemption, chunked prefill, n > 1 copy-on-write and abort: all must leave the
greedy output unchanged and the block pool consistent."""

from __future__ import annotations

import pytest

from splitserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def make(model_dir, **kw) -> LLM:
    kw.setdefault("dtype", "float32")
    kw.setdefault("block_size", 8)
    return LLM(model=str(model_dir), **kw)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Outputs of a roomy engine with every optimisation that could change results turned off."""
    llm = make(tiny_llama_dir, num_kv_blocks=512, enable_prefix_caching=False)
    return llm


def prompts_sharing_prefix() -> list[list[int]]:
    shared = list(range(1000, 1061))  # 61 tokens: 7 full blocks of 8 + a partial one
    return [shared + [5, 6, 7], shared + [9] * 11, shared + list(range(300, 340))]


def test_prefix_cache_reuses_full_blocks_and_keeps_output(tiny_llama_dir, reference):
    prompts = prompts_sharing_prefix()
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)]
    llm = make(tiny_llama_dir, num_kv_blocks=128)
    first = llm.generate(prompts[:1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    rest = llm.generate(prompts[1:], GREEDY)
    for out in rest:
        assert out.num_cached_tokens == 56  # all 7 full shared blocks, nothing more
    assert [o.outputs[0].token_ids for o in [first, *rest]] == expected
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits == 112
    # the computed-token count proves only the rest was computed: a repeat hits everything but
    # the last block's worth, which must still be computed to produce logits
    again = llm.generate(prompts[2:], GREEDY)[0]
    assert again.num_cached_tokens == (len(prompts[2]) - 1) // 8 * 8
    assert again.outputs[0].token_ids == expected[2]
    llm.engine.check_integrity()


def test_preemption_keeps_outputs(tiny_llama_dir, reference):
    prompts = [list(range(10 + i, 40 + 3 * i)) for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    # 8 sequences of up to ~110 tokens need ~100 blocks of 8; give it 24.
    llm = make(tiny_llama_dir, num_kv_blocks=24)
    outputs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected
    llm.engine.check_integrity()


def test_chunked_prefill_keeps_output(tiny_llama_dir, reference):
    long_prompt = list(range(2000, 2300))  # 300 tokens
    short = [[5, 6, 7], [8, 9, 10, 11]]
    expected = [o.outputs[0].token_ids for o in reference.generate([long_prompt, *short], GREEDY)]
    llm = make(tiny_llama_dir, num_kv_blocks=256, max_num_batched_tokens=64)
    outputs = llm.generate([long_prompt, *short], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    llm.engine.check_integrity()


def test_n_samples_share_prompt_blocks_copy_on_write(tiny_llama_dir):
    llm = make(tiny_llama_dir, num_kv_blocks=64)
    prompt = list(range(500, 530))  # 30 tokens: the last block is partial -> COW on fork
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    # each sample equals an independent run with the same per-sample seed
    for o in out.outputs:
        single = SamplingParams(temperature=1.0, seed=7 + o.index, max_tokens=12, ignore_eos=True)
        alone = make(tiny_llama_dir, num_kv_blocks=64).generate([prompt], single)[0]
        assert alone.outputs[0].token_ids == o.token_ids
    llm.engine.check_integrity()


def test_n_greedy_samples_are_identical_and_blocks_return(tiny_llama_dir, reference):
    prompt = list(range(700, 723))
    expected = reference.generate([prompt], GREEDY)[0].outputs[0].token_ids
    llm = make(tiny_llama_dir, num_kv_blocks=64)
    params = SamplingParams(n=4, temperature=0.0, max_tokens=20, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert all(o.token_ids == expected for o in out.outputs)
    assert llm.engine.kv.pool.num_free_blocks == 64
    llm.engine.check_integrity()


def test_abort_frees_blocks_at_once(tiny_llama_dir):
    llm = make(tiny_llama_dir, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("a", list(range(100, 140)), GREEDY)
    engine.add_request("b", list(range(200, 220)), GREEDY)
    engine.add_request("c", list(range(300, 310)), GREEDY)
    engine.step()
    engine.step()
    assert engine.kv.pool.num_free_blocks < 64
    assert engine.abort_request("a")
    assert engine.abort_request("c")
    assert not engine.abort_request("a")  # already gone
    engine.check_integrity()
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert {d.request_id for d in deltas} == {"b"}
    assert deltas[-1].finish_reason == "length"
    assert engine.kv.pool.num_free_blocks == 64
    engine.check_integrity()


def test_generate_accepts_vllm_prompt_forms(tiny_llama_dir, reference):
    ids = [5, 6, 7, 8]
    expected = reference.generate([ids], GREEDY)[0].outputs[0].token_ids
    forms = [ids, {"prompt_token_ids": ids}]
    outs = reference.generate(forms, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [expected, expected]
    text = reference.tokenizer.decode(ids)
    assert reference.generate({"prompt": text}, GREEDY)[0].prompt == text
    with pytest.raises(ValueError, match="prompt"):
        reference.generate([{"text": "x"}], GREEDY)
