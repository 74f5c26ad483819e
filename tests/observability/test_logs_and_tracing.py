"""splitserve.observability on its own: request ids, JSON lines, trace context in metadata."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from splitserve.observability import logs, tracing


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("abc-123", True), ("a" * 128, True), ("a" * 129, False), ("has space", False),
     ("", False), (None, False), ("tab\tx", False), ("é", False)],
)  # fmt: skip
def test_a_client_request_id_is_kept_only_when_it_can_be_logged_and_echoed(sent, kept) -> None:
    got = logs.accept_request_id(sent)
    assert (got == sent) is kept
    if not kept:
        assert got.startswith("req-") and len(got) == 36


def test_json_lines_carry_request_id_role_and_engine(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.setup_logging("info", "json", "prefill", "prefill-0")
        log = logging.getLogger("t")
        with logs.bound(logs.RequestLog("r-1")):
            log.info("in %s", "request", extra={"status": 200})
        log.info("outside")
        logs.set_engine_id("prefill-7")
        log.warning("later")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["message"] for x in lines] == ["in request", "outside", "later"]
    assert lines[0]["request_id"] == "r-1" and lines[0]["status"] == 200
    assert lines[1]["request_id"] is None
    assert {x["role"] for x in lines} == {"prefill"}
    assert [x["engine_id"] for x in lines] == ["prefill-0", "prefill-0", "prefill-7"]
    assert lines[2]["level"] == "WARNING" and lines[0]["timestamp"].endswith("+00:00")
    with pytest.raises(ValueError, match="log format"):
        logs.setup_logging("info", "xml", "router")


def test_tracing_off_costs_nothing_and_sends_only_the_request_id() -> None:
    assert not tracing.enabled()
    assert tracing.outgoing_metadata() is None
    with tracing.span("x") as s:
        assert s is None
    assert tracing.start_span("y") is None and tracing.start_server_span("z", ()) is None
    with logs.bound(logs.RequestLog("r-2")):
        assert tracing.outgoing_metadata() == (("x-request-id", "r-2"),)
    metadata = (("x-request-id", "r-3"),)
    assert logs.bind_from_metadata(metadata).request_id == "r-3"


def test_trace_context_crosses_metadata_and_intervals_nest(monkeypatch) -> None:
    monkeypatch.setitem(tracing._state, "tracer", None)
    monkeypatch.setitem(tracing._state, "provider", None)
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing("router", "r0", exporter=exporter)
    with tracing.span("POST /v1/completions") as top:
        client = tracing.start_span("decode")
        metadata = tracing.outgoing_metadata(client)
    assert dict(metadata)["traceparent"].split("-")[1] == format(top.context.trace_id, "032x")
    # The "pod" side: a server span under the caller's span, an interval recorded after the fact.
    server = tracing.start_server_span("decode", metadata)
    now = time.monotonic()
    with tracing.using(server):
        tracing.record_interval("decode.stream", now - 0.5, now, {"splitserve.output_tokens": 3})
    tracing.end_span(server)
    tracing.end_span(client)
    tracing._state["provider"].force_flush()
    spans = {s.name + ("@pod" if s.kind.name == "SERVER" else ""): s
             for s in exporter.get_finished_spans()}  # fmt: skip
    assert spans["decode@pod"].parent.span_id == spans["decode"].context.span_id
    assert spans["decode"].parent.span_id == spans["POST /v1/completions"].context.span_id
    stream = spans["decode.stream"]
    assert stream.parent.span_id == spans["decode@pod"].context.span_id
    assert 0.49e9 < stream.end_time - stream.start_time < 0.51e9
    assert stream.attributes["splitserve.output_tokens"] == 3
    assert {s.resource.attributes["service.name"] for s in spans.values()} == {"splitserve-router"}
    tracing.shutdown()
