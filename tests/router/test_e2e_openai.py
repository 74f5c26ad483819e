"""The official `openai` SDK against a real local stack (router + prefill + decode processes).

The offline engine is the oracle: greedy output through the disaggregated stack must equal
``LLM().generate`` token for token.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from splitserve import LLM, SamplingParams
from splitserve.protocol.sampling import StructuredOutput

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def oracle() -> LLM:
    return LLM(kv_cache_memory_bytes=64 << 20, max_num_seqs=8)


@pytest.fixture(scope="module")
def sdk(real_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_stack.url + "/v1", api_key="unused", max_retries=0)


def test_greedy_completion_and_chat_equal_the_offline_engine(sdk, oracle):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    want = [o.outputs[0].text for o in oracle.generate(PROMPTS, params)]
    got = [
        sdk.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for p in PROMPTS
    ]
    assert got == want
    # A batch of prompts in one request gives one choice per prompt, in order.
    batch = sdk.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == want

    chat_want = oracle.chat(CHAT, params)[0].outputs[0].text
    chat = sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == chat_want
    assert chat.choices[0].message.role == "assistant"


def test_streaming_equals_non_streaming(sdk):
    full = sdk.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    stream = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    comp = list(
        sdk.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True
        )
    )
    assert comp[-1].choices[0].finish_reason in ("length", "stop")


def test_n2_and_seed_reproducibility(sdk):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=1.0, n=2)
    a = sdk.completions.create(seed=1234, **kw)
    b = sdk.completions.create(seed=1234, **kw)
    c = sdk.completions.create(seed=999, **kw)
    texts = lambda r: [x.text for x in sorted(r.choices, key=lambda x: x.index)]  # noqa: E731
    assert len(a.choices) == 2 and [x.index for x in a.choices] == [0, 1]
    assert texts(a) == texts(b)  # same seed, same samples
    assert texts(a) != texts(c)  # another seed, other samples
    assert texts(a)[0] != texts(a)[1]  # the two samples differ (seed + i)
    d = sdk.completions.create(seed=7, extra_body={"ignore_eos": True}, **kw)
    assert d.usage.completion_tokens == 20  # both samples' tokens are counted


def test_best_of_returns_the_most_likely_samples(sdk):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11)
    # best_of runs samples seed + i, i < best_of, exactly as n does: n = 4 shows all of them.
    every = sdk.completions.create(n=4, logprobs=0, **kw).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    best = sdk.completions.create(n=2, best_of=4, **kw)
    got = [c.text for c in best.choices]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert set(got) <= set(score)
    # The most likely first, both at least as likely as the rest (up to bf16 noise between
    # batch shapes).
    assert score[got[0]] >= score[got[1]] - 0.3
    rest = [v for t, v in score.items() if t not in got]
    assert not rest or min(score[t] for t in got) >= max(rest) - 0.3
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in every)


def test_stop_strings(sdk, oracle):
    full = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0]
    text = full.outputs[0].text
    assert "." in text, "pick a prompt whose greedy output has a period"
    r = sdk.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=["."]
    )
    assert r.choices[0].text == text[: text.index(".")]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs_match_the_offline_engine(sdk, oracle):
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=2)
    want = oracle.generate(PROMPTS[0], params)[0].outputs[0]
    r = sdk.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.top_logprobs) == 5 and all(len(t) == 2 for t in lp.top_logprobs)
    assert r.choices[0].text == want.text  # the same greedy tokens ...
    for got, ref in zip(lp.token_logprobs, want.logprobs, strict=True):
        # ... with bf16 logprobs that differ by batch shape and prefix-cache reuse, not more.
        assert got == pytest.approx(ref.logprob, abs=0.2)
    chat = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.logprob <= 0 for c in content)


def test_logit_bias_forces_tokens_and_bad_keys_are_400(sdk, tokenizer):
    forced = tokenizer.encode(" banana", add_special_tokens=False)[0]
    for temperature in (0.0, 1.0):
        r = sdk.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=temperature, seed=1,
            logit_bias={str(forced): 100}, logprobs=0,
        )  # fmt: skip
        assert r.choices[0].logprobs.tokens == [tokenizer.token_text(forced)] * 6
        assert r.choices[0].text == tokenizer.decode([forced] * 6)
    chat = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0.7, logit_bias={str(forced): 100}
    )
    assert chat.choices[0].message.content == tokenizer.decode([forced] * 4)
    allowed = tokenizer.encode(" yes no", add_special_tokens=False)
    r = sdk.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, logprobs=0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
    )  # fmt: skip
    tokens = r.choices[0].logprobs.tokens
    assert len(tokens) == 8 and set(tokens) <= {tokenizer.token_text(t) for t in allowed}
    for bias in ({"banana": 100}, {str(forced): 1000}, {"49152": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, logit_bias=bias)
        assert info.value.param == "logit_bias" and "logit_bias" in info.value.message
    r = sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
ASK_JSON = [{"role": "user", "content": "Give a person's name and age as JSON."}]


def test_response_format_json_schema_through_prefill_and_decode(sdk, oracle):
    spec = {"name": "person", "schema": PERSON, "strict": True}
    fmt = {"type": "json_schema", "json_schema": spec}
    r = sdk.chat.completions.create(
        model=MODEL, messages=ASK_JSON, max_tokens=40, temperature=0, response_format=fmt
    )
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert r.choices[0].finish_reason == "stop"
    # The decode pod continued the prefill pod's first token in the grammar: the same greedy
    # output as one engine.
    params = SamplingParams(
        temperature=0, max_tokens=40, structured_output=StructuredOutput(json_schema=PERSON)
    )
    assert text == oracle.chat(ASK_JSON, params)[0].outputs[0].text
    # Seeded random sampling, two samples, streamed: each parses and validates.
    stream = sdk.chat.completions.create(
        model=MODEL, messages=ASK_JSON, max_tokens=40, temperature=1.0, seed=5, n=2,
        response_format=fmt, stream=True,
    )  # fmt: skip
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for sample in texts:
        jsonschema.validate(json.loads(sample), PERSON)
    obj = sdk.chat.completions.create(
        model=MODEL, messages=ASK_JSON, max_tokens=40, temperature=0,
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = sdk.completions.create(
        model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=4, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert choice.choices[0].text in ("yes", "no")


def test_bad_structured_output_is_a_400_naming_the_field_then_serves(sdk):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format=bad)
    assert info.value.param == "response_format.json_schema.schema"
    assert "nonsense" in info.value.message
    # Valid JSON Schema that the grammar compiler rejects: the engine says 400 itself.
    dangling = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=ASK_JSON, response_format=dangling)
    assert "structured_output.json_schema" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "(a"})
    assert "structured_output.regex" in info.value.message
    r = sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_cached_tokens_count_prefix_hits(sdk):
    prompt = "A long shared context. " * 40
    sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    r = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert r.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 16
    assert r.usage.prompt_tokens_details.cached_tokens % 16 == 0


def test_64_concurrent_streaming_clients(real_stack, tokenizer):
    client = openai.AsyncOpenAI(base_url=real_stack.url + "/v1", api_key="x", max_retries=0)
    prompts = [f"Request number {i}: write a word." for i in range(64)]

    async def one(prompt: str) -> tuple[int, int, str, object]:
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0.7, seed=1, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        text, usage, deltas = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                deltas += 1
            if chunk.usage is not None:
                usage = chunk.usage
        return len(tokenizer.encode(prompt)), deltas, text, usage

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for n_prompt, deltas, text, usage in results:
        assert usage is not None
        assert usage.prompt_tokens == n_prompt
        assert usage.completion_tokens == 8
        assert usage.total_tokens == n_prompt + 8
        assert 1 <= deltas <= 8 and text


def test_bad_input_then_serves(sdk):
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="x")
    r = sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_continuous_usage_stats_and_suffix_refused(sdk):
    """vLLM's continuous_usage_stats: running usage on every chunk; suffix is a clear 400."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True,
            stream_options=opts,
        )
    )  # fmt: skip
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and counts[0] >= 1
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    chat = list(
        sdk.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4, temperature=0, stream=True,
            stream_options=opts,
        )
    )  # fmt: skip
    assert chat[-2].usage is not None and chat[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=MODEL, prompt="def f(", suffix="return 1", max_tokens=2)
    assert err.value.body["param"] == "suffix"
    assert sdk.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens
