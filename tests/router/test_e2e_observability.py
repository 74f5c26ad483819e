"""Traces and structured logs of the real local stack (`splitserve serve --log-format json`).

The test process runs an OTLP/gRPC trace collector (the collector side of OpenTelemetry's own
protocol, spans kept in memory); the stack exports to it through ``OTEL_EXPORTER_OTLP_ENDPOINT``,
as a pod does when the InferenceService sets ``spec.observability.tracing``. One request that
carries a W3C ``traceparent`` must come back as one trace, with spans from the router, the
prefill process and the decode process, linked parent to child across the gRPC hops. Every log
line of every process is one JSON object; the request's lines carry its ``X-Request-Id``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import defaultdict
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span: (service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((attrs.get("service.name", "?"), s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> dict[str, dict[str, object]]:
        """service -> span name -> span, of one trace."""
        out: dict[str, dict[str, object]] = defaultdict(dict)
        with self.lock:
            for service, span in self.spans:
                if span.trace_id == trace_id:
                    out[service][span.name] = span
        return out


@pytest.fixture(scope="module")
def observed(serve_factory):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave soon after they end
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        stack = serve_factory(["--prefill-replicas", "1", "--decode-replicas", "1",
                               "--log-format", "json", "--log-level", "info"])  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield stack, collector
    stack.stop()
    server.stop(0)


def _chat(stack, headers: dict[str, str]) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}  # fmt: skip
    return httpx.post(stack.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_one_request_is_one_trace_across_router_prefill_and_decode(observed):
    stack, collector = observed
    trace_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8)
    traceparent = f"00-{trace_id.hex()}-{parent_id.hex()}-01"
    r = _chat(stack, {"traceparent": traceparent})
    assert r.status_code == 200, r.text
    want = {
        "splitserve-router": {"POST /v1/chat/completions", "route", "prefill", "decode"},
        "splitserve-prefill": {"prefill", "prefill.queue", "prefill.compute", "kv.lease"},
        "splitserve-decode": {"decode", "kv.pull", "decode.queue", "decode.first_token",
                              "decode.stream"},
    }  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        got = collector.trace(trace_id)
        if all(names <= set(got.get(svc, {})) for svc, names in want.items()):
            break
        assert time.monotonic() < deadline, {s: sorted(n) for s, n in got.items()}
        time.sleep(0.2)
    router, prefill, decode = (got[s] for s in want)
    # Linked across the hops: client -> router server span -> its pod calls -> the pods' spans.
    assert router["POST /v1/chat/completions"].parent_span_id == parent_id
    top = router["POST /v1/chat/completions"].span_id
    assert router["route"].parent_span_id == top and router["prefill"].parent_span_id == top
    assert router["decode"].parent_span_id == top
    assert prefill["prefill"].parent_span_id == router["prefill"].span_id
    assert decode["decode"].parent_span_id == router["decode"].span_id
    for name in ("prefill.queue", "prefill.compute", "kv.lease"):
        assert prefill[name].parent_span_id == prefill["prefill"].span_id, name
    for name in ("kv.pull", "decode.queue", "decode.first_token", "decode.stream"):
        assert decode[name].parent_span_id == decode["decode"].span_id, name
    # The engine's timed intervals nest in time inside their server span.
    for spans, outer, inner in ((prefill, "prefill", "prefill.compute"),
                                (decode, "decode", "decode.stream")):  # fmt: skip
        o, i = spans[outer], spans[inner]
        slack = 5_000_000  # ns: the two clocks (monotonic vs wall) are read at different moments
        assert o.start_time_unix_nano - slack <= i.start_time_unix_nano
        assert i.end_time_unix_nano <= o.end_time_unix_nano + slack
    attrs = {a.key: a for a in router["route"].attributes}
    assert attrs["splitserve.prompt_tokens"].value.int_value > 0
    assert attrs["splitserve.decode_pod"].value.string_value


def test_request_id_is_echoed_logged_on_every_process_and_json_lines_parse(observed):
    stack, _ = observed
    mine = f"client-{secrets.token_hex(6)}"
    r = _chat(stack, {"x-request-id": mine})
    assert r.status_code == 200 and r.headers["x-request-id"] == mine
    # No id, or one we will not echo (spaces, too long): the router makes one.
    for sent in (None, "has spaces", "x" * 500):
        r = _chat(stack, {} if sent is None else {"x-request-id": sent})
        assert r.status_code == 200 and r.headers["x-request-id"].startswith("req-")
    # Errors carry it too.
    bad = httpx.post(stack.url + "/v1/chat/completions", json={"model": MODEL},
                     headers={"x-request-id": "bad-1"}, timeout=30)  # fmt: skip
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"

    def lines() -> list[dict]:
        # Every line of every process (serve's own included) is one JSON object.
        return [json.loads(line) for line in stack.log.read_text().splitlines() if line]

    deadline = time.monotonic() + 15
    while True:
        recs = [x for x in lines() if x.get("request_id") == mine]
        roles = {x["role"] for x in recs}
        if {"router", "prefill", "decode"} <= roles:
            break
        assert time.monotonic() < deadline, recs
        time.sleep(0.2)
    for x in lines():
        assert {"timestamp", "level", "logger", "message", "role", "engine_id"} <= set(x), x
    access = [x for x in recs if x["logger"] == "splitserve.access"]
    assert len(access) == 1, access
    (a,) = access
    assert a["status"] == 200 and a["route"] == "/v1/chat/completions" and a["method"] == "POST"
    assert a["prompt_tokens"] > 0 and 0 < a["completion_tokens"] <= 4 and a["latency_ms"] > 0
    engines = {x["engine_id"] for x in recs if x["role"] in ("prefill", "decode")}
    assert engines == {"prefill-0", "decode-0"}
    deadline = time.monotonic() + 15  # the access line is written after the response went out
    while not [x for x in lines() if x.get("request_id") == "bad-1" and x.get("status") == 400]:
        assert time.monotonic() < deadline, "no access-log line for the 400"
        time.sleep(0.2)
