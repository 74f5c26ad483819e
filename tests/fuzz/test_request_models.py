"""A standing fuzz target over the router's request path, in-process (no server).

Bodies are built from the request models' own field names with values from a pool of edge
cases (integer widths, NaN, lone surrogates, deep nesting, wrong types), written as raw JSON,
then run through everything the router does before it calls a pod: parse, validate, the
cross-field rules, the engine's ``SamplingParams`` and the wire conversion. Each step may refuse
the input only the controlled way (``APIError`` / ``ValueError``, which become 4xx); anything
else is a bug that would be a 500. The example budget is small so the normal suite runs it;
``SPLITSERVE_FUZZ_EXAMPLES=N`` runs it longer.
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.protocol.wire import params_to_proto
from splitserve.services.router.body import parse_json, validate
from splitserve.services.router.errors import APIError, render_error
from splitserve.services.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

EXAMPLES = int(os.environ.get("SPLITSERVE_FUZZ_EXAMPLES", "300"))
MODELS = [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest]

INTS = st.sampled_from(
    [0, 1, -1, 2, 16, 20, 21, 128, 129, 49151, 49152, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
     2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30]
)  # fmt: skip
FLOATS = st.one_of(
    st.sampled_from([0.0, 1e-9, 0.5, 1.0, 2.0, 2.0000001, 100.0, 101.0, -0.0, -2.5, 1e308]),
    st.floats(allow_nan=False, allow_infinity=False),
)
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfff", "\x00", "m", "text", "json_object", "function", ""]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=20,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"])},
    optional={
        "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"])}, optional={"text": TEXT}))),
        "tool_calls": JSON,
        "name": TEXT,
    },
)  # fmt: skip


def _field_values(name: str) -> st.SearchStrategy:
    """Values for a field: its plausible shapes and anything at all."""
    special = {
        "model": st.just("m"),
        "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=3), st.lists(INTS, max_size=3),
                            st.lists(st.lists(INTS, max_size=2), max_size=2)),
        "messages": st.lists(MESSAGE, max_size=3),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20)),
        "logit_bias": st.dictionaries(st.one_of(TEXT, INTS.map(str)), FLOATS, max_size=3),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "yaml"])},
            optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": JSON})},
        ),
        "tools": st.lists(st.fixed_dictionaries(
            {"type": st.just("function"),
             "function": st.fixed_dictionaries({"name": TEXT}, optional={"parameters": JSON})}),
            max_size=2),
        "tool_choice": st.one_of(TEXT, JSON),
    }  # fmt: skip
    return st.one_of(special.get(name, SCALARS), JSON)


@st.composite
def bodies(draw) -> tuple[type, bytes]:
    model = draw(st.sampled_from(MODELS))
    names = sorted(model.model_fields)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=8))
    body = {"model": "m"} if draw(st.booleans()) else {}
    for name in chosen:
        field = model.model_fields[name]
        body[field.alias or name] = draw(_field_values(name))
    if draw(st.integers(0, 9)) == 0:  # now and then, the whole body is something else
        return model, draw(st.one_of(JSON.map(json.dumps), st.binary(max_size=40)))
    return model, json.dumps(body).encode() if isinstance(body, dict) else body


def _engine_params(req) -> None:
    """What serving does with a valid request before any pod sees it."""
    req_fields = getattr(req, "check_fields", None)
    if req_fields is None:
        return
    req.check_fields()
    if isinstance(req, CompletionRequest):
        req.samples_per_prompt()
        req.prompts()
        logprobs = req.logprobs
    else:
        req.tool_plan()
        logprobs = req.requested_logprobs()
    params = req.sampling_params(max_tokens=req.max_tokens, logprobs=logprobs, default_max=16)
    params.check_token_ids(49152)
    params_to_proto(params)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(item=bodies())
def test_request_path_refuses_only_the_controlled_way(item):
    model, raw = item
    body = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogatepass")
    try:
        req = validate(model, parse_json(body), {"max_temperature": 2.0})
        _engine_params(req)
    except APIError as err:
        assert 400 <= err.status < 500
        assert json.loads(render_error(err))["error"]["message"]
    except ValueError as err:  # serving turns these into 400s naming the field
        assert str(err)
