"""Structured output (JSON schema, JSON object, regex, choice, EBNF) through the real engine.

Specs and their validation; the sampler's bitmask step against an unpacked reference; then the
default SmolLM2 model under each kind of constraint, greedy and seeded, n = 2, next to
unconstrained requests, through a hand-off's adopted first token, preemption and abort.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.sampler import Sampler, SamplingRow
from splitserve.engine.structured_output import StructuredOutputs, TokenBitmask
from splitserve.protocol.sampling import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
}
ASK = [{"role": "user", "content": "Describe a person (name, age, pets) as JSON."}]


# -- the spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"regex": "a", "choice": ("a",)},
        {"json_object": True, "grammar": 'root ::= "a"'},
        {"json_object": False},
        {"json_schema": "{not json"},
        {"json_schema": "[1, 2]"},
        {"choice": ()},
        {"choice": "ab"},
        {"choice": ("a", 3)},
        {"regex": ""},
        {"grammar": 5},
    ],
)
def test_invalid_specs_name_the_field(kwargs):
    with pytest.raises(ValueError, match="^structured_output"):
        StructuredOutput(**kwargs)


def test_specs_are_immutable_hashable_and_canonical():
    a = StructuredOutput(json_schema=SCHEMA)  # a dict is serialised
    b = StructuredOutput(json_schema=json.dumps(SCHEMA, indent=4))
    assert a == b and hash(a) == hash(b) and a.kind == "json_schema"
    assert list(json.loads(a.json_schema)["properties"]) == ["name", "age", "pets"]  # order kept
    c = StructuredOutput(choice=["x", "y"])
    assert c.choice == ("x", "y") and c.kind == "choice"
    p = SamplingParams(structured_output=c)
    assert hash(p) == hash(dataclasses.replace(p)) and p.structured_output is c
    with pytest.raises(ValueError, match="^structured_output"):
        SamplingParams(structured_output={"regex": "a"})


# -- the sampler's bitmask step --------------------------------------------------------------------


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """bool [R, V] (V a multiple of 32) -> xgrammar's int32 words, bit j of word w = token 32w+j."""
    packed = np.packbits(allowed.numpy(), axis=-1, bitorder="little")
    return torch.from_numpy(packed.view(np.int32).copy())


def test_sampler_masks_the_constrained_rows_only():
    V, rows = 256, 6
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, V, generator=g) * 3
    allowed = torch.rand(rows, V, generator=g) < 0.05
    allowed[:, 7] = True  # never empty
    mask = TokenBitmask(_pack(allowed), rows=(0, 2, 3, 5))
    assert torch.equal(mask.allowed(V), allowed[[0, 2, 3, 5]])  # the reference unpacking
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=4, min_tokens=5),  # min_tokens yields to the grammar
        SamplingParams(temperature=1.5, top_k=3, repetition_penalty=1.3),
        SamplingParams(seed=5),
        SamplingParams(temperature=0.0, allowed_token_ids=(1, 7, 9), logit_bias={9: 5.0}),
    ]
    sampler = Sampler(V, eos_token_id=7)
    raw = [SamplingRow(p, [3, 4], [], None) for p in params]
    for r, p in zip(raw, params, strict=True):
        r.generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)
    before = logits.clone()
    masked = sampler._apply_penalties(logits, raw, mask)
    assert torch.equal(logits, before)  # the input is never modified
    for i in mask.rows:
        want = torch.where(allowed[i], logits[i], float("-inf"))
        if i == 3:  # repetition penalty comes after the mask, on what is left
            pen = want[[3, 4]]
            want[[3, 4]] = torch.where(pen > 0, pen / 1.3, pen * 1.3)
        if i == 5:
            want[[j for j in range(V) if j not in (1, 7, 9)]] = float("-inf")
            want[9] += 5.0
        assert torch.equal(masked[i], want), i
    for _ in range(20):
        out = sampler(logits, raw, mask)
        for i in mask.rows:
            assert allowed[i, out.token_ids[i]], (i, out.token_ids[i])
    assert out.token_ids[0] == int(torch.where(allowed[0], logits[0], -1e9).argmax())
    assert out.token_ids[1] == int(logits[1].argmax())  # an unconstrained greedy row
    # Logprobs are of the raw logits, mask or not.
    ref = torch.log_softmax(logits[0], -1)
    assert out.logprobs[0].logprob == pytest.approx(float(ref[out.token_ids[0]]), abs=1e-5)
    assert [t.token_id for t in out.logprobs[0].top] == ref.topk(2).indices.tolist()


# -- compile, match, fill with the real tokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def outputs(default_model_dir) -> StructuredOutputs:
    from transformers import AutoTokenizer

    return StructuredOutputs(AutoTokenizer.from_pretrained(default_model_dir), 49152, [2])


def test_grammar_state_follows_tokens_and_ends_on_eos(outputs, default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    spec = StructuredOutput(choice=("yes", "no way"))
    assert outputs.compile(spec) is outputs.compile(StructuredOutput(choice=["yes", "no way"]))
    seq = outputs.start(spec)
    mask = outputs.fill_bitmask([None, seq, None])
    assert mask is not None and mask.rows == (1,)
    first = mask.allowed(49152)[0].nonzero().flatten().tolist()
    assert 2 not in first and tok.encode("no", add_special_tokens=False)[0] in first
    twin = seq.fork()
    for t in tok.encode("no way", add_special_tokens=False):
        assert not seq.advance(t)
    assert outputs.fill_bitmask([seq]).allowed(49152)[0].nonzero().flatten().tolist() == [2]
    assert seq.advance(2) and seq.done  # EOS where the grammar ends: the sequence ends
    assert not twin.advance(tok.encode("yes", add_special_tokens=False)[0])  # independent
    assert outputs.fill_bitmask([None, None]) is None


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (StructuredOutput(regex="[a-"), "Unclosed"),
        (StructuredOutput(json_schema={"$ref": "#/definitions/missing"}), "missing"),
        (StructuredOutput(json_schema={"type": "nonsense"}), "nonsense"),
        (StructuredOutput(grammar="root ::= "), "EBNF"),
        (StructuredOutput(grammar='start ::= "a"'), "root"),
    ],
)
def test_invalid_grammars_raise_value_error_naming_the_field(outputs, spec, why):
    with pytest.raises(ValueError, match=f"^structured_output.{spec.kind} .*{why}"):
        outputs.compile(spec)


# -- the engine with the default model -------------------------------------------------------------


def _json(spec: dict, **kw) -> SamplingParams:
    return SamplingParams(structured_output=StructuredOutput(json_schema=spec), **kw)


@pytest.mark.model
def test_json_schema_output_parses_and_validates(default_llm):
    prompt = default_llm.apply_chat_template(ASK)
    free = SamplingParams(temperature=0.0, max_tokens=6)
    params = [
        _json(SCHEMA, temperature=0.0, max_tokens=48),
        _json(SCHEMA, temperature=1.0, seed=7, n=2, max_tokens=48),
        SamplingParams(structured_output=StructuredOutput(json_object=True), max_tokens=48,
                       temperature=0.0),
        free,
    ]  # fmt: skip
    outs = default_llm.generate([prompt] * 4, params)
    samples = [*outs[0].outputs, *outs[1].outputs]
    for o in samples:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
        assert o.token_ids[-1] == 2  # ended by EOS, which the grammar allowed only here
    assert samples[1].text != samples[2].text  # the two seeded samples have their own matchers
    assert isinstance(json.loads(outs[2].outputs[0].text), dict)
    # Seeded sampling is reproducible under a grammar, and the unconstrained row is unaffected.
    again = default_llm.generate([prompt, prompt], [params[1], free])
    assert [o.text for o in again[0].outputs] == [o.text for o in outs[1].outputs]
    assert again[1].outputs[0].text == outs[3].outputs[0].text
    default_llm.engine.check_integrity()


@pytest.mark.model
def test_regex_and_choice_constrain_the_output(default_llm):
    prompts = ["My phone number is", "Is the sky blue? Answer:", "Write a haiku:"]
    regex = r"\+1 [0-9]{3}-[0-9]{4}"
    choices = ("yes", "no", "maybe")
    params = [
        SamplingParams(structured_output=StructuredOutput(regex=regex), seed=1, max_tokens=20),
        SamplingParams(structured_output=StructuredOutput(choice=choices), temperature=0.0),
        SamplingParams(
            structured_output=StructuredOutput(grammar='root ::= "ab" [0-9] "!"'),
            temperature=0.0, max_tokens=12, ignore_eos=True, min_tokens=10,
        ),
    ]  # fmt: skip
    a, b, c = (o.outputs[0] for o in default_llm.generate(prompts, params))
    assert re.fullmatch(regex, a.text) and a.finish_reason == "stop"
    assert b.text in choices and b.finish_reason == "stop"
    # The grammar's end ends the output whatever ignore_eos / min_tokens say.
    assert re.fullmatch(r"ab[0-9]!", c.text) and c.finish_reason == "stop"


@pytest.mark.model
def test_invalid_spec_raises_at_add_request_and_engine_keeps_serving(default_llm):
    engine = default_llm.engine
    keep = _json({"type": "object", "properties": {"x": {"type": "integer"}}}, temperature=0.0)
    engine.add_request("keep", "A JSON object:", dataclasses.replace(keep, max_tokens=24))
    bad = [
        StructuredOutput(regex="(unclosed"),
        StructuredOutput(json_schema={"$ref": "#/definitions/none"}),
        StructuredOutput(grammar="root ::= ("),
    ]
    for spec in bad:
        with pytest.raises(ValueError, match=f"^structured_output.{spec.kind}"):
            engine.add_request("bad", "x", SamplingParams(structured_output=spec))
        with pytest.raises(ValueError, match=f"^structured_output.{spec.kind}"):
            default_llm.generate(["x"], SamplingParams(structured_output=spec))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert {d.request_id for d in deltas} == {"keep"} and deltas[-1].finish_reason == "stop"
    assert isinstance(json.loads("".join(d.text for d in deltas))["x"], int)
    engine.check_integrity()


@pytest.mark.model
def test_adopted_first_token_advances_the_grammar(default_llm):
    """The decode side of a hand-off: the first token comes from the prefill engine."""
    engine = default_llm.engine
    prompt = default_llm.apply_chat_template(ASK)
    params = _json(SCHEMA, temperature=0.0, max_tokens=48)
    want = default_llm.generate([prompt], params)[0].outputs[0]
    first = dataclasses.replace(params, max_tokens=1)  # what the prefill server samples
    (delta,) = _drain(engine, "p", prompt, first)
    assert delta.token_ids[0] == want.token_ids[0] and delta.finish_reason == "length"
    assert engine.reserve_import("d", prompt, params) is not None
    out = engine.recompute_import("d", prompt, params, [(delta.token_ids[0], None)])
    while engine.has_unfinished():
        out += engine.step()
    assert "".join(d.text for d in out) == want.text
    jsonschema.validate(json.loads(want.text), SCHEMA)
    engine.check_integrity()


def _drain(engine, rid, prompt, params):
    engine.add_request(rid, prompt, params)
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    return deltas


def test_preemption_and_abort_keep_grammar_state(tiny_llama_dir):
    # A pool too small for every sequence at once: requests are preempted and recomputed.
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=10, block_size=16)
    regex = "[a-z]{3}( [a-z]{2,6}){4,6}"  # at most 45 characters: it ends within max_tokens
    params = SamplingParams(
        structured_output=StructuredOutput(regex=regex), temperature=1.0, seed=3, max_tokens=48
    )
    prompts = [list(range(100 + 7 * i, 130 + 7 * i)) for i in range(4)]
    outs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preemptions > 0
    for o in outs:
        assert re.fullmatch(regex, o.outputs[0].text), o.outputs[0].text
        assert o.outputs[0].finish_reason == "stop"
    engine = llm.engine
    engine.add_request("gone", prompts[0], params)
    engine.step()
    assert engine.abort_request("gone")
    engine.check_integrity()
    assert re.fullmatch(regex, llm.generate(prompts[:1], params)[0].outputs[0].text)


def test_the_grammar_cache_is_bounded_by_count_and_bytes(default_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from splitserve.engine import structured_output as so

    outputs = StructuredOutputs(AutoTokenizer.from_pretrained(default_model_dir), 49152, [2])
    one = outputs.compile(StructuredOutput(regex="a{1}")).memory_size_bytes
    limit = int(one * 2.5)
    monkeypatch.setattr(so, "_CACHE_BYTES", limit)
    monkeypatch.setattr(so, "_CACHE_SIZE", 10)
    for i in range(2, 8):
        outputs.compile(StructuredOutput(regex=f"a{{{i}}}"))
    entries, nbytes = outputs.cache_size
    assert 1 <= entries < 7 and nbytes <= limit  # evicted by bytes, not by count
    monkeypatch.setattr(so, "_CACHE_BYTES", 1 << 40)
    monkeypatch.setattr(so, "_CACHE_SIZE", 4)
    for i in range(8, 20):
        outputs.compile(StructuredOutput(regex=f"b{{{i}}}"))
    assert outputs.cache_size[0] == 4
