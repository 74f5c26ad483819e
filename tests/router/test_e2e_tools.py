"""Tools / function calling through a real stack (router + prefill + decode processes) and the
official `openai` SDK: forced calls decode under their schema, "required" picks a declared tool,
tool results go back through the chat template, bad tool fields are 400s naming the field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def sdk(real_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_stack.url + "/v1", api_key="unused", max_retries=0)


def test_named_tool_choice_returns_a_valid_call_streamed_or_not(sdk):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
        max_tokens=30, temperature=0,
    )  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])

    stream = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
        max_tokens=30, temperature=0, stream=True,
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    head = deltas[0]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert len(deltas) > 2  # the arguments come as they are generated
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    args = "".join(d.function.arguments for d in deltas)
    assert args == call.function.arguments  # greedy: the same call as without streaming
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].delta.content is None for c in chunks)


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_one_of_the_tools(sdk, parallel):
    r = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=parallel, max_tokens=60, temperature=0,
    )  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    assert c.message.tool_calls and (parallel or len(c.message.tool_calls) == 1)
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_result_round_trip_gives_an_answer(sdk):
    first = sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=30, temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
    ]
    for stream in (False, True):
        r = sdk.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=12, temperature=0,
            stream=stream,
        )  # fmt: skip
        if stream:
            chunks = [c for c in r if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish in ("stop", "length", "tool_calls")
        assert text or finish == "tool_calls"


def test_bad_tool_fields_are_400s_naming_the_field_then_serves(sdk):
    named = {"type": "function", "function": {"name": "nope"}}
    cases = [
        ("tool_choice", dict(tools=[WEATHER], tool_choice=named)),
        ("tool_choice", dict(tool_choice="required")),
        ("tools", dict(tools=[WEATHER, WEATHER])),
        (
            "response_format",
            dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
        ),
    ]
    for param, kw in cases:
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
        assert info.value.param == param, info.value.message
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
