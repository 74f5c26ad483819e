"""OpenTelemetry traces across router, prefill and decode, with W3C trace context in gRPC metadata.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set when
a server starts: then spans go out by OTLP (gRPC, or HTTP/protobuf when
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` and that exporter is installed), batched, under the
standard ``OTEL_*`` settings (service name, sampler, batch delays). When off, every helper here
returns at its first line: no span objects, no context work, no metadata.

Spans (names are stable; docs/observability.md lists their attributes):
- router: ``POST <route>`` (server span of the HTTP request, the client's ``traceparent``
  honoured), ``route`` (the routing decision), ``prefill`` and ``decode`` (the calls to the pods);
- prefill pod: ``prefill`` (server span), with ``prefill.queue``, ``prefill.compute`` and
  ``kv.lease`` (the grant) under it;
- decode pod: ``decode`` (server span), with ``kv.pull``, ``decode.queue``, ``decode.first_token``
  and ``decode.stream`` under it.
Spans of work the engine timed (queue, compute, stream) are recorded after the fact from its
``RequestTiming``, with their real start and end times.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from splitserve.observability.logs import REQUEST_ID_KEY, request_id

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TRACER_NAME = "splitserve"
_state: dict[str, Any] = {"tracer": None, "provider": None}


def enabled() -> bool:
    return _state["tracer"] is not None


def setup_tracing(role: str, engine_id: str | None = None, *, exporter=None) -> bool:
    """Start exporting this process's spans when an OTLP endpoint is configured (or ``exporter``
    is given, as tests do); whether tracing is on."""
    if exporter is None and not any(os.environ.get(k) for k in ENDPOINT_ENVS):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        exporter = _otlp_exporter()
    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or f"splitserve-{role}",
             "splitserve.role": role}  # fmt: skip
    if engine_id:
        attrs["splitserve.engine_id"] = engine_id
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _state["provider"] = provider
    _state["tracer"] = provider.get_tracer(_TRACER_NAME)
    return True


def _otlp_exporter():
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as err:
            raise SystemExit(
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs the package "
                "opentelemetry-exporter-otlp-proto-http (or use grpc, installed)"
            ) from err
        return OTLPSpanExporter()
    raise SystemExit(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")


def shutdown() -> None:
    """Flush what is buffered (at exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
) -> Iterator[Span | None]:
    """A span around the block, current inside it (None when tracing is off). An exception
    leaving the block marks it as an error."""
    tracer = _state["tracer"]
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=dict(attributes or {})
    ) as s:
        yield s


def call_metadata(context) -> tuple:
    """A gRPC call's metadata, () for a context that has none (a servicer called directly)."""
    get = getattr(context, "invocation_metadata", None)
    return tuple(get() or ()) if get is not None else ()


def server_span(name: str, metadata, attributes: Mapping[str, Any] | None = None):
    """A server span for a gRPC call, child of the trace context its metadata carries."""
    if _state["tracer"] is None:
        return span(name)
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return span(name, attributes, kind=SpanKind.SERVER, parent=propagate.extract(carrier))


def start_server_span(name: str, metadata, attributes: Mapping[str, Any] | None = None):
    """``server_span`` that does not become current: for a streaming handler (an async
    generator), which makes it current only around each step (``using``) and ends it itself.
    A span current across a ``yield`` would be detached in whatever task finally closes the
    generator, which fails."""
    tracer = _state["tracer"]
    if tracer is None:
        return None
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return tracer.start_span(
        name, context=propagate.extract(carrier), kind=SpanKind.SERVER,
        attributes=dict(attributes or {}),
    )  # fmt: skip


def using(s: Span | None):
    """``s`` current inside the block (spans made there are its children); no-op for None."""
    if s is None:
        return contextlib.nullcontext()
    return trace.use_span(s, end_on_exit=False)


def http_server_span(name: str, headers: list[tuple[bytes, bytes]], attributes=None):
    """The router's span of one HTTP request, child of the client's ``traceparent`` if sent."""
    if _state["tracer"] is None:
        return span(name)
    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    return span(name, attributes, kind=SpanKind.SERVER, parent=propagate.extract(carrier))


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A span under the current one that does not become current (for work that spans the
    yields of an async generator, where a current span would leak to the consumer); the caller
    ends it (``end_span``). None when tracing is off."""
    tracer = _state["tracer"]
    if tracer is None:
        return None
    return tracer.start_span(name, attributes=dict(attributes or {}))


def end_span(s: Span | None) -> None:
    if s is not None:
        s.end()


def outgoing_metadata(parent: Span | None = None) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata for a call to a pod: the request id and, when tracing, the W3C trace
    context of ``parent`` (default: the current span)."""
    out: list[tuple[str, str]] = []
    rid = request_id()
    if rid is not None:
        out.append((REQUEST_ID_KEY, rid))
    if _state["tracer"] is not None:
        carrier: dict[str, str] = {}
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        propagate.inject(carrier, context=ctx)
        out.extend(carrier.items())
    return tuple(out) or None


def record_interval(
    name: str, start_s: float, end_s: float, attributes: Mapping[str, Any] | None = None
) -> None:
    """A finished span under the current one, for work timed elsewhere; times on
    ``time.monotonic()``'s clock."""
    tracer = _state["tracer"]
    if tracer is None or end_s < start_s:
        return
    offset = time.time_ns() - time.monotonic_ns()
    s = tracer.start_span(
        name, start_time=int(start_s * 1e9) + offset, attributes=dict(attributes or {})
    )
    s.end(end_time=int(end_s * 1e9) + offset)


def set_attributes(s: Span | None, attributes: Mapping[str, Any]) -> None:
    if s is not None:
        s.set_attributes({k: v for k, v in attributes.items() if v is not None})


def set_error(s: Span | None, message: str) -> None:
    if s is not None:
        s.set_status(Status(StatusCode.ERROR, message))


def add_event(s: Span | None, name: str, attributes: Mapping[str, Any] | None = None) -> None:
    if s is not None:
        s.add_event(name, dict(attributes or {}))
