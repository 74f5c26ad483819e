"""schemathesis against the router's own /openapi.json, in front of fake pods.

Positive and negative cases (about 50 per operation) from the document the router serves: no
case may get a 5xx, every status and content type must be documented, every JSON body must
match its schema, and data the schema forbids must be refused with a 4xx. Proves the document
is true and the router never breaks on input the schema allows or forbids.
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 50


OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("GET", "/health"),
    ("GET", "/ping"),
    ("POST", "/ping"),
    ("GET", "/version"),
    ("GET", "/metrics"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
]


@pytest.fixture(scope="module")
def api_schema(disagg):
    router, _ = disagg
    return schemathesis.openapi.from_url(router.url + "/openapi.json")


def test_the_document_lists_every_operation(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


# Negative cases need a body to break: the bodiless operations have positive ones only.
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST" and p != "/ping"
]
# SPLITSERVE_SCHEMATHESIS_STATS=FILE: append the statuses seen, one JSON line per run.
STATS = os.environ.get("SPLITSERVE_SCHEMATHESIS_STATS")


@pytest.mark.parametrize(
    ("method", "path", "mode"), RUNS, ids=[f"{m} {p} {g.value}" for m, p, g in RUNS]
)
def test_api_conforms_to_its_openapi_document(api_schema, method, path, mode):
    operation = api_schema[path][method]
    failures: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "m"  # the served name (any other is a documented 404)
        try:
            response = case.call_and_validate(checks=CHECKS, timeout=60)
            statuses[response.status_code] += 1
        except Exception as err:  # noqa: BLE001 - collected, reported together below
            failures.append(f"{err}")
            statuses[getattr(getattr(err, "response", None), "status_code", -1)] += 1

    run()
    if STATS:
        with open(STATS, "a") as f:
            record = {"op": f"{method} {path}", "mode": mode.value, "statuses": statuses}
            f.write(json.dumps(record) + "\n")
    assert not failures, "\n\n".join(failures[:5])
