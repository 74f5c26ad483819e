"""SamplingParams across the wire: the router's and the servers' encoders against the decoder."""

from __future__ import annotations

import pytest

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.sampling import SamplingParams, StructuredOutput
from splitserve.protocol.wire import params_from_proto, params_to_proto

PARAMS = [
    SamplingParams(),
    SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        seed=5,
        max_tokens=None,
        stop=["\n"],
        logprobs=2,
        logit_bias={50256: -100, 7: 0.1, 12: 100.0, 3: -2.3},
        allowed_token_ids=[7, 12, 3, 40000],
    ),
    SamplingParams(logit_bias=[(0, -12.3456)], allowed_token_ids=[0]),
    *(
        SamplingParams(structured_output=StructuredOutput(**spec))
        for spec in (
            {"json_schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
            {"json_object": True},
            {"regex": "[0-9]+"},
            {"choice": ("yes", "no", "")},
            {"grammar": 'root ::= "a" | "b"'},
        )
    ),
]


@pytest.mark.parametrize("params", PARAMS)
def test_round_trip_through_bytes(params):
    wire = params_to_proto(params).SerializeToString()
    got = params_from_proto(pb.SamplingParams.FromString(wire))
    # float32 on the wire, rounded back to 6 digits: what the client sent.
    assert got == params


def test_unset_fields_stay_unset_on_the_wire():
    msg = params_to_proto(SamplingParams())
    assert not msg.logit_bias and not msg.allowed_token_ids
    assert params_from_proto(msg).logit_bias is None
    assert params_from_proto(msg).allowed_token_ids is None


def test_float32_rounding_keeps_biases_in_range():
    msg = params_to_proto(SamplingParams(logit_bias={1: 99.99999, 2: -100}))
    assert params_from_proto(msg).logit_bias == ((1, 100.0), (2, -100.0))


def test_bad_wire_values_raise_naming_the_field():
    with pytest.raises(ValueError, match="^logit_bias"):
        params_from_proto(pb.SamplingParams(logit_bias={5: 300.0}))


def test_structured_output_wire_errors_name_the_field():
    msg = pb.SamplingParams(structured_output=pb.SamplingParams.StructuredOutput())
    with pytest.raises(ValueError, match="^structured_output"):
        params_from_proto(msg)
    msg.structured_output.json_schema = "{not json"
    with pytest.raises(ValueError, match="^structured_output.json_schema"):
        params_from_proto(msg)
