"""Hand-written bad (and edge) HTTP requests with the status each must get from the router.

Shared by ``test_api_hardening.py`` (every case answers its status with an OpenAI error body)
and the before/after measurement in the issue notes. The first eleven are the issue's known
plain-text 500s. Bodies are raw bytes so escapes (lone surrogates) and depth are exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON = {"content-type": "application/json"}
_CMPL = "/v1/completions"
_CHAT = "/v1/chat/completions"
_USER = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: bytes | None
    status: int
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    param: str | None = None  # the error's `param`, when the case pins it


def _j(obj: Any) -> bytes:
    # ensure_ascii escapes lone surrogates as \udXXX, exactly what a careless client sends.
    return json.dumps(obj).encode()


def cmpl(name: str, status: int, param: str | None = None, **fields: Any) -> Case:
    body = {"model": "m", "prompt": "x", "max_tokens": 1, **fields}
    return Case(name, _CMPL, _j(body), status, param=param)


def chat(name: str, status: int, param: str | None = None, **fields: Any) -> Case:
    body = {"model": "m", "messages": _USER, "max_tokens": 1, **fields}
    return Case(name, _CHAT, _j(body), status, param=param)


def _deep(depth: int) -> bytes:
    return b'{"model": "m", "prompt": "x", "ignored": ' + b"[" * depth + b"]" * depth + b"}"


KNOWN_500S = [
    cmpl("top_k 2**31", 400, "top_k", top_k=2**31),
    cmpl("seed 2**63", 400, "seed", seed=2**63),
    cmpl("stop_token_ids 2**32", 400, "stop_token_ids", stop_token_ids=[2**32]),
    chat("min_tokens 2**32", 400, "min_tokens", min_tokens=2**32, max_tokens=None),
    Case("surrogate prompt", _CMPL, _j({"model": "m", "prompt": "\ud800"}), 400),
    cmpl("surrogate stop", 400, stop="\ud800"),
    Case("surrogate model", _CMPL, _j({"model": "\ud800", "prompt": "x"}), 400),
    cmpl("surrogate guided_regex", 400, guided_regex="\ud800"),
    Case("surrogate tokenize", "/tokenize", _j({"prompt": "\udfff"}), 400),
    Case("depth 5000", _CMPL, _deep(5000), 400),
    Case("depth 100000", _CMPL, _deep(100_000), 400),
]

RANGES = [
    cmpl("top_k -2", 400, "top_k", top_k=-2),
    cmpl("top_k 1.5", 400, "top_k", top_k=1.5),
    cmpl("seed -2**63-1", 400, "seed", seed=-(2**63) - 1),
    cmpl("seed float", 400, "seed", seed=1.5),
    cmpl("seed string", 400, "seed", seed="7"),
    cmpl("n true", 400, "n", n=True),
    cmpl("n string", 400, "n", n="2"),
    cmpl("n 129", 400, "n", n=129),
    cmpl("n 2**64", 400, "n", n=2**64),
    cmpl("temperature 2.5", 400, "temperature", temperature=2.5),
    cmpl("temperature 100", 400, "temperature", temperature=100),
    cmpl("temperature -0.1", 400, "temperature", temperature=-0.1),
    cmpl("temperature true", 400, "temperature", temperature=True),
    cmpl("temperature string", 400, "temperature", temperature="0.5"),
    cmpl("top_p 0", 400, "top_p", top_p=0),
    cmpl("top_p 1.5", 400, "top_p", top_p=1.5),
    cmpl("min_p 2", 400, "min_p", min_p=2),
    cmpl("presence_penalty 3", 400, "presence_penalty", presence_penalty=3),
    cmpl("frequency_penalty -3", 400, "frequency_penalty", frequency_penalty=-3),
    cmpl("repetition_penalty 0", 400, "repetition_penalty", repetition_penalty=0),
    cmpl("max_tokens 0", 400, "max_tokens", max_tokens=0),
    cmpl("max_tokens 2**32", 400, "max_tokens", max_tokens=2**32),
    cmpl("max_tokens 1e9 in range, past the context", 400, "max_tokens", max_tokens=10**9),
    cmpl("min_tokens -1", 400, "min_tokens", min_tokens=-1),
    cmpl("min_tokens > max_tokens", 400, "min_tokens", min_tokens=5),
    cmpl("stop_token_ids -1", 400, "stop_token_ids", stop_token_ids=[-1]),
    cmpl("stop_token_ids vocab", 400, "stop_token_ids", stop_token_ids=[49152]),
    cmpl("stop 17 strings", 400, "stop", stop=[f"s{i}" for i in range(17)]),
    cmpl("stop empty string", 400, "stop", stop=[""]),
    cmpl("stop int", 400, "stop", stop=5),
    cmpl("logprobs 21", 400, "logprobs", logprobs=21),
    cmpl("logprobs -1", 400, "logprobs", logprobs=-1),
    cmpl("best_of 129", 400, "best_of", best_of=129),
    cmpl("logit_bias 2**40 key", 400, "logit_bias", logit_bias={str(2**40): 1}),
    cmpl("logit_bias 1025 entries", 400, "logit_bias", logit_bias={str(i): 1 for i in range(1025)}),
    cmpl("allowed_token_ids 2**40", 400, "allowed_token_ids", allowed_token_ids=[2**40]),
    cmpl("allowed_token_ids empty", 400, "allowed_token_ids", allowed_token_ids=[]),
    cmpl("cache_salt int", 400, "cache_salt", cache_salt=5),
    cmpl("echo string", 400, "echo", echo="yes"),
    cmpl(
        "stream_options without stream",
        400,
        "stream_options",
        stream_options={"include_usage": True},
    ),  # fmt: skip
    cmpl("suffix", 400, "suffix", suffix="tail"),
    Case("prompt token -1", _CMPL, _j({"model": "m", "prompt": [1, -1]}), 400, param="prompt"),
    Case("prompt token 2**64", _CMPL, _j({"model": "m", "prompt": [2**64]}), 400, param="prompt"),
    Case("prompt token vocab", _CMPL, _j({"model": "m", "prompt": [49152]}), 400, param="prompt"),
    Case("prompt empty list", _CMPL, _j({"model": "m", "prompt": []}), 400, param="prompt"),
    Case("prompt [[]]", _CMPL, _j({"model": "m", "prompt": [[]]}), 400, param="prompt"),
    Case("prompt empty string", _CMPL, _j({"model": "m", "prompt": ""}), 400, param="prompt"),
    Case("prompt mixed list", _CMPL, _j({"model": "m", "prompt": ["a", 1]}), 400),
    Case(
        "prompt 600 KB",
        _CMPL,
        _j({"model": "m", "prompt": "hello " * 100_000}),
        400,
        param="prompt",
    ),  # fmt: skip
    Case("model missing", _CMPL, _j({"prompt": "x"}), 400, param="model"),
    Case("model int", _CMPL, _j({"model": 5, "prompt": "x"}), 400, param="model"),
    Case("model unknown", _CMPL, _j({"model": "nope", "prompt": "x"}), 404, param="model"),
    Case("model unknown, 1 MB name", _CMPL, _j({"model": "n" * 1_000_000, "prompt": "x"}), 404),
]

CHAT = [
    chat("top_logprobs 50", 400, "top_logprobs", logprobs=True, top_logprobs=50),
    chat("top_logprobs without logprobs", 400, "top_logprobs", top_logprobs=2),
    chat("max_completion_tokens 0", 400, "max_completion_tokens", max_completion_tokens=0),
    chat("logprobs int", 400, "logprobs", logprobs=3),
    chat(
        "image part",
        400,
        "messages.0.content",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    ),  # fmt: skip
    chat(
        "text part without text",
        400,
        "messages.0.content",
        messages=[{"role": "user", "content": [{"type": "text"}]}],
    ),  # fmt: skip
    chat("content int", 400, "messages.0.content", messages=[{"role": "user", "content": 5}]),
    chat("role missing", 400, "messages.0.role", messages=[{"content": "x"}]),
    chat("role wizard", 400, "messages.0.role", messages=[{"role": "wizard", "content": "x"}]),
    chat("messages empty", 400, "messages", messages=[]),
    chat("messages object", 400, "messages", messages={"role": "user"}),
    chat("surrogate content", 400, messages=[{"role": "user", "content": "a\udc80"}]),
    chat("surrogate tool name", 400, tools=[{"type": "function", "function": {"name": "\ud801"}}]),
    chat(
        "tool bad name",
        400,
        "tools.0.function.name",
        tools=[{"type": "function", "function": {"name": "a b"}}],
    ),  # fmt: skip
    chat(
        "tool_choice unknown",
        400,
        "tool_choice",
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice={"type": "function", "function": {"name": "g"}},
    ),  # fmt: skip
    chat("tool_choice without tools", 400, "tool_choice", tool_choice="required"),
    chat("response_format yaml", 400, "response_format.type", response_format={"type": "yaml"}),
    chat("guided_json bad schema", 400, "guided_json", guided_json={"type": 5}),
    chat(
        "guided_json 40 deep",
        400,
        "guided_json",
        guided_json=json.loads('{"items": ' * 40 + "{}" + "}" * 40),
    ),  # fmt: skip
    chat("guided_choice empty", 400, "guided_choice", guided_choice=[]),
    chat("surrogate guided_choice", 400, guided_choice=["\ud800"]),
    chat(
        "stream_options without stream",
        400,
        "stream_options",
        stream_options={"include_usage": True},
    ),  # fmt: skip
]

ENCODING = [
    Case("invalid JSON", _CMPL, b"{not json", 400),
    Case("empty body", _CMPL, b"", 400),
    Case("body null", _CMPL, b"null", 400),
    Case("body list", _CMPL, b"[1, 2]", 400),
    Case("body number", _CMPL, b"1", 400),
    Case("trailing garbage", _CMPL, b'{"model": "m", "prompt": "x"} x', 400),
    Case("invalid UTF-8", _CMPL, b'{"model": "m", "prompt": "\xff\xfe"}', 400),
    Case("NaN literal", _CMPL, b'{"model": "m", "prompt": "x", "temperature": NaN}', 400),
    Case("Infinity literal", _CMPL, b'{"model": "m", "prompt": "x", "top_p": Infinity}', 400),
    Case("1e400", _CMPL, b'{"model": "m", "prompt": "x", "temperature": 1e400}', 400),
    Case(
        "int of 5000 digits",
        _CMPL,
        b'{"model": "m", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        400,
    ),  # fmt: skip
    Case(
        "depth 300 in a schema field",
        _CHAT,
        b'{"model": "m", "messages": [], "guided_json": ' + b'{"a":' * 300 + b"1" + b"}" * 301,
        400,
    ),  # fmt: skip
    Case(
        "text/plain",
        _CMPL,
        _j({"model": "m", "prompt": "x"}),
        415,
        headers={"content-type": "text/plain"},
    ),  # fmt: skip
    Case(
        "form-encoded",
        _CMPL,
        b"model=m&prompt=x",
        415,
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),  # fmt: skip
    Case(
        "json with charset",
        _CMPL,
        _j({"model": "m", "prompt": "x", "max_tokens": 1}),
        200,
        headers={"content-type": "application/json; charset=utf-8"},
    ),  # fmt: skip
    Case(
        "no content-type",
        _CMPL,
        _j({"model": "m", "prompt": "x", "max_tokens": 1}),
        200,
        headers={},
    ),  # fmt: skip
    Case("body over the limit", _CMPL, _j({"model": "m", "prompt": "x" * (9 << 20)}), 413),
]

ROUTES = [
    Case("GET completions", _CMPL, None, 405, method="GET", headers={}),
    Case("DELETE models", "/v1/models", None, 405, method="DELETE", headers={}),
    Case("embeddings", "/v1/embeddings", _j({"model": "m", "input": "x"}), 404),
    Case("responses", "/v1/responses", _j({"model": "m", "input": "x"}), 404),
    Case("audio", "/v1/audio/transcriptions", b"{}", 404),
    Case("unknown path", "/v1/nothing-here", None, 404, method="GET", headers={}),
    Case("ping", "/ping", None, 200, method="GET", headers={}),
    Case("version", "/version", None, 200, method="GET", headers={}),
    Case("openapi", "/openapi.json", None, 200, method="GET", headers={}),
    Case("detokenize -1", "/detokenize", _j({"tokens": [-1]}), 400, param="tokens"),
    Case("detokenize 2**70", "/detokenize", _j({"tokens": [2**70]}), 400, param="tokens"),
    Case("tokenize both", "/tokenize", _j({"prompt": "x", "messages": _USER}), 400),
    Case("tokenize neither", "/tokenize", _j({}), 400),
    Case(
        "model id surrogate-free unknown", "/v1/models/nope", None, 404, method="GET", headers={}
    ),  # fmt: skip
]

ALL = KNOWN_500S + RANGES + CHAT + ENCODING + ROUTES
