"""logit_bias (OpenAI) and allowed_token_ids (vLLM): validation, and the engine honouring them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from splitserve import LLM, SamplingParams
from splitserve.protocol.sampling import MAX_LOGIT_BIAS

FORCED = 1234  # an ordinary token of the default tokenizer (EOS is 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),  # string keys are the router's to convert
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"logit_bias": {5: math.inf}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
        ({"logit_bias": {5: True}}, "logit_bias"),
        ({"logit_bias": [(5, 1.0), (5, 2.0)]}, "logit_bias"),
        ({"logit_bias": [5, 6]}, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(MAX_LOGIT_BIAS + 1), 1.0)}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
        ({"allowed_token_ids": [1.5]}, "allowed_token_ids"),
        ({"allowed_token_ids": ["7"]}, "allowed_token_ids"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_stored_forms_are_immutable_and_hashable():
    a = SamplingParams(logit_bias={9: 1, 2: -100.0, 5: 0.5}, allowed_token_ids=[4, 2])
    assert a.logit_bias == ((2, -100.0), (5, 0.5), (9, 1.0))
    assert all(isinstance(b, float) for _, b in a.logit_bias)
    assert a.allowed_token_ids == (4, 2)
    b = SamplingParams(logit_bias=[(5, 0.5), (9, 1.0), (2, -100)], allowed_token_ids=(4, 2))
    assert a == b and hash(a) == hash(b)
    assert dataclasses.replace(a, n=2).logit_bias == a.logit_bias  # re-validated, same form
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams().logit_bias is None and SamplingParams().allowed_token_ids is None
    assert len(SamplingParams(logit_bias=dict.fromkeys(range(MAX_LOGIT_BIAS), 1)).logit_bias)


def test_check_token_ids_against_the_vocabulary():
    SamplingParams(logit_bias={99: 1}, allowed_token_ids=[0, 99]).check_token_ids(100)
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={100: 1}).check_token_ids(100)
    with pytest.raises(ValueError, match="^allowed_token_ids"):
        SamplingParams(allowed_token_ids=[3, 100]).check_token_ids(100)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama_dir) -> LLM:
    return LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=64)


def test_engine_honours_logit_bias_and_allowed_token_ids(tiny_llm):
    prompts = ["Hello there, how are", "Once upon a time", "1, 2, 3,", "The weather today"]
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(seed=3, temperature=1.0, max_tokens=8, ignore_eos=True)
    allowed = (17, 250, 3000)
    params = [
        dataclasses.replace(plain, logit_bias={FORCED: 100}),
        dataclasses.replace(seeded, logit_bias={FORCED: 100}),
        dataclasses.replace(seeded, allowed_token_ids=allowed),
        plain,
    ]
    outs = [o.outputs[0] for o in tiny_llm.generate(prompts, params)]
    assert outs[0].token_ids == [FORCED] * 8
    assert outs[1].token_ids == [FORCED] * 8
    assert len(outs[2].token_ids) == 8 and set(outs[2].token_ids) <= set(allowed)
    # The unconstrained request in the same batch is what it is alone.
    alone = tiny_llm.generate(prompts[3], plain)[0].outputs[0]
    assert outs[3].token_ids == alone.token_ids
    assert FORCED not in alone.token_ids  # so the forcing above was the bias, not the model
    # A -100 bias on the greedy choice moves greedy decoding off it at the first token.
    first = alone.token_ids[0]
    banned = tiny_llm.generate(
        prompts[3], dataclasses.replace(plain, max_tokens=1, logit_bias={first: -100})
    )[0].outputs[0]
    assert banned.token_ids[0] != first


def test_out_of_vocabulary_ids_raise_and_engine_keeps_serving(tiny_llm):
    engine = tiny_llm.engine
    vocab = engine.shape.vocab_size
    engine.add_request("keep", "Hello there,", SamplingParams(temperature=0, max_tokens=6))
    with pytest.raises(ValueError, match="^logit_bias"):
        tiny_llm.generate(["hi"], SamplingParams(max_tokens=2, logit_bias={vocab: 5}))
    with pytest.raises(ValueError, match="^allowed_token_ids"):
        tiny_llm.generate(["hi"], SamplingParams(max_tokens=2, allowed_token_ids=[1, vocab + 7]))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert deltas[-1].request_id == "keep" and deltas[-1].finish_reason == "length"
    assert len(deltas) == 6
    engine.check_integrity()
