"""Tools / function calling without a model: request validation, output constraints, template
input, parsing "auto" output, stream deltas (pure functions and the real tokenizer)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from splitserve.engine.model.loader import resolve_model
from splitserve.services.router.protocol import ChatCompletionRequest, ChatMessage, Tool
from splitserve.services.router.tokenizer import RouterTokenizer
from splitserve.services.router.tool_calls import (
    ParsedCall,
    ParsedOutput,
    ToolCallStream,
    chat_message,
    parse_auto,
)
from splitserve.services.router.tools import (
    ToolPlan,
    plan_tools,
    template_messages,
    with_tool_system_text,
)

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ZONE = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "time", "description": "Now.", "parameters": ZONE}},
]
NAMES = ("weather", "time")


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def plan(**kw) -> ToolPlan:
    p = request(tools=TOOLS, **kw).tool_plan()
    assert p is not None
    return p


# ---- parsing "auto" output ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("Plain answer.", "Plain answer.", []),
        (
            '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            None,
            [("weather", {"city": "Oslo"})],
        ),
        (  # text around the blocks stays content; two calls
            'Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>'
            '\n<tool_call>{"name": "time", "arguments": {"zone": "UTC"}}</tool_call>',
            "Let me check.",
            [("weather", {"city": "A"}), ("time", {"zone": "UTC"})],
        ),
        (  # the last block cut before its closing tag (EOS)
            '<tool_call>{"name": "time", "arguments": {"zone": "CET"}}',
            None,
            [("time", {"zone": "CET"})],
        ),
        (  # bare JSON, "parameters" for "arguments", arguments as JSON text
            '{"name": "time", "parameters": "{\\"zone\\": \\"UTC\\"}"}',
            None,
            [("time", {"zone": "UTC"})],
        ),
        ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "same", []),
        ('<tool_call>{"name": "weather", "arguments": [1]}</tool_call>', "same", []),
        ('<tool_call>{"name": "weather", "arguments": {"city": </tool_call>', "same", []),
        (  # one bad block: nothing is dropped, the whole text stays content
            '<tool_call>{"name": "time", "arguments": {}}</tool_call><tool_call>x</tool_call>',
            "same",
            [],
        ),
        ('{"name": "nope", "arguments": {}}', "same", []),
    ],
)
def test_parse_auto(text, content, calls):
    out = parse_auto(text, NAMES)
    assert out.content == (text if content == "same" else content)
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == calls


def test_auto_message_and_finish_reasons():
    p = plan()
    block = '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
    message, finish = chat_message(p, block, "stop")
    assert finish == "tool_calls" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Rome"}'}
    assert chat_message(p, "Hello", "length") == (
        {"role": "assistant", "content": "Hello"},
        "length",
    )
    none = plan(tool_choice="none")
    assert chat_message(none, block, "stop")[0] == {"role": "assistant", "content": block}


def test_forced_messages():
    named = plan(tool_choice={"type": "function", "function": {"name": "time"}})
    message, finish = chat_message(named, '{"zone": "UTC"}', "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "time", "arguments": '{"zone": "UTC"}'}
    assert chat_message(named, '{"zone": "U', "length")[1] == "length"  # cut: not "tool_calls"
    required = plan(tool_choice="required")
    two = '[{"name": "time", "arguments": {"zone": "UTC"}}, {"name": "weather", "arguments": {}}]'
    message, finish = chat_message(required, two, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["time", "weather"]
    assert finish == "tool_calls"
    single = plan(tool_choice="required", parallel_tool_calls=False)
    message, _ = chat_message(single, '{"name": "time", "arguments": {"zone": "CET"}}', "stop")
    assert message["tool_calls"][0]["function"]["arguments"] == '{"zone": "CET"}'
    cut = '[{"name": "time", "argu'
    assert chat_message(required, cut, "length") == (
        {"role": "assistant", "content": cut},
        "length",
    )


# ---- request validation and constraints --------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(tool_choice="auto"), "tool_choice"),
        (
            dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}),
            "tool_choice",
        ),
        (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
        (
            dict(
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}]
            ),
            "tools.0.function.parameters",
        ),
        (dict(tools=TOOLS, tool_choice="required", guided_regex="a"), "guided_regex"),
        (
            dict(
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "time"}},
                response_format={"type": "json_object"},
            ),
            "response_format",
        ),
    ],
)
def test_bad_tool_requests_name_the_field(kw, field):
    with pytest.raises(ValueError) as info:
        request(**kw).structured_output()
    assert str(info.value).split(" ", 1)[0] == field


def test_plans_and_their_constraints():
    assert request().tool_plan() is None and request(tool_choice="none").tool_plan() is None
    assert plan().mode == "auto" and plan().constraint() is None
    assert request(tools=TOOLS, response_format={"type": "json_object"}).structured_output()
    named = plan(tool_choice={"type": "function", "function": {"name": "weather"}})
    assert json.loads(named.constraint().json_schema) == CITY
    required = plan(tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.constraint().json_schema)
    jsonschema.validate({"name": "time", "arguments": {"zone": "UTC"}}, schema)
    with pytest.raises(jsonschema.ValidationError):  # name and arguments go together
        jsonschema.validate({"name": "weather", "arguments": {"zone": "UTC"}}, schema)
    parallel = json.loads(plan(tool_choice="required").constraint().json_schema)
    jsonschema.validate([{"name": "weather", "arguments": {"city": "X"}}], parallel)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], parallel)
    bare = Tool.model_validate({"type": "function", "function": {"name": "ping"}})
    empty = plan_tools([bare], None)
    assert empty is not None and empty.template_tools()[0]["function"]["parameters"] == {
        "type": "object",
        "properties": {},
    }


# ---- the chat template's input -----------------------------------------------------------------

ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
]


def messages(raw) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


def test_template_messages_native_and_hermes():
    native = template_messages(messages(ROUND_TRIP), native=True)
    call = native[1]["tool_calls"][0]
    assert call == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": {"city": "Oslo"}},
    }
    assert native[2] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}
    hermes = template_messages(messages(ROUND_TRIP), native=False)
    assert hermes[1]["content"] == (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert parse_auto(hermes[1]["content"], NAMES).calls == (
        ParsedCall("weather", '{"city": "Oslo"}'),
    )
    assert hermes[2] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}
    with pytest.raises(ValueError, match=r"^messages\.2\.tool_call_id"):
        template_messages(messages([*ROUND_TRIP[:2], {"role": "tool", "content": "x"}]), True)
    bad = json.loads(json.dumps(ROUND_TRIP))
    bad[1]["tool_calls"][0]["function"]["arguments"] = "{oops"
    with pytest.raises(ValueError, match=r"^messages\.1\.tool_calls\.0\.function\.arguments"):
        template_messages(messages(bad), native=True)


def test_system_text_lists_the_tools():
    p = plan()
    out = with_tool_system_text([{"role": "user", "content": "hi"}], p)
    assert out[0]["role"] == "system" and '"name": "time"' in out[0]["content"]
    assert "<tool_call>" in out[0]["content"] and out[1] == {"role": "user", "content": "hi"}
    out = with_tool_system_text([{"role": "system", "content": "Be brief."}], p)
    assert len(out) == 1 and out[0]["content"].startswith("Be brief.\n\n")


# A minimal tool-aware template in the shape of Qwen's / Hermes' (tools as JSON, calls with
# their arguments as objects, tool results in their own turn).
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }}:{{ c.function.arguments.city }}]"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_tokenizer_passes_tools_to_templates_that_render_them(tokenizer):
    assert not tokenizer.renders_tools and not tokenizer.renders_tool_calls  # SmolLM2's
    tok = RouterTokenizer(resolve_model(None))
    tok._tok.chat_template = TOOL_TEMPLATE
    assert tok.renders_tools and tok.renders_tool_calls
    ids = tok.apply_chat_template(
        template_messages(messages(ROUND_TRIP), native=True), tools=plan().template_tools()
    )
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<tools>weather;time;</tools>")
    assert "[weather:Oslo]" in text and "<|im_start|>tool\n12 C" in text


# ---- streaming ---------------------------------------------------------------------------------


def test_named_stream_deltas():
    s = ToolCallStream(plan(tool_choice={"type": "function", "function": {"name": "time"}}))
    deltas, finish = s.feed('{"zone"', None)
    assert finish is None and len(deltas) == 2
    head = deltas[0]["tool_calls"][0]
    assert head["index"] == 0 and head["id"] == s.call_id and head["type"] == "function"
    assert head["function"] == {"name": "time", "arguments": ""}
    assert deltas[1] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"zone"'}}]}
    deltas, finish = s.feed(': "UTC"}', "stop")
    assert finish == "tool_calls" and len(deltas) == 1


def test_buffered_stream_deltas():
    s = ToolCallStream(plan())
    assert s.feed("Sure. <tool_call>", None) == ([], None)
    deltas, finish = s.feed('{"name": "time", "arguments": {}}</tool_call>', "stop")
    assert finish == "tool_calls"
    assert deltas[0] == {"content": "Sure."}
    assert deltas[1]["tool_calls"][0]["function"] == {"name": "time", "arguments": "{}"}
    plain = ToolCallStream(plan())
    plain.feed("Just ", None)
    assert plain.feed("text.", "length") == ([{"content": "Just text."}], "length")
    assert ParsedOutput("x").calls == ()
