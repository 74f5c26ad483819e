"""What tracing costs: per request in-process, and end to end on the local stack, on vs off.

No span is made per decode step: each request gets a fixed set (router 4, prefill 4, decode 5;
the engine-timed ones recorded once, at the end, from ``RequestTiming``). So the cost is per
request, and this measures it two ways in one run:

1. in-process: the 13 spans of one request (``splitserve.observability.tracing``) with the
   SDK's BatchSpanProcessor and an exporter that drops them, against the same calls with
   tracing off (which return at their first line);
2. the local stack (``splitserve serve``, 1 prefill + 1 decode): the same sequential requests
   with tracing off, then exporting to an OTLP/gRPC collector in this process; the median
   latency per request and per output token of each, and the ratio.

    .venv/bin/python -P bench/tracing_overhead.py [--requests 40] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import timeit
from concurrent import futures
from pathlib import Path

import httpx


def spans_per_request_us(number: int = 2000) -> dict[str, float]:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from splitserve.observability import logs, tracing

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    def one_request() -> None:
        now = time.monotonic()
        with logs.bound(logs.RequestLog("req-1")), tracing.span("POST /v1/chat/completions"):
            with tracing.span("route") as s:
                tracing.set_attributes(s, {"splitserve.policy": "prefix", "a": 1})
            with tracing.span("prefill"):
                md = tracing.outgoing_metadata()
            with tracing.server_span("prefill", md):
                tracing.record_interval("prefill.queue", now - 0.2, now - 0.1)
                tracing.record_interval("prefill.compute", now - 0.1, now)
                with tracing.span("kv.lease"):
                    pass
            d = tracing.start_span("decode")
            md = tracing.outgoing_metadata(d)
            with tracing.server_span("decode", md):
                with tracing.span("kv.pull"):
                    pass
                for name in ("decode.queue", "decode.first_token", "decode.stream"):
                    tracing.record_interval(name, now - 0.1, now)
            tracing.add_event(d, "first message")
            tracing.end_span(d)

    off = min(timeit.repeat(one_request, number=number, repeat=5)) / number * 1e6
    tracing.setup_tracing("bench", exporter=Drop())
    on = min(timeit.repeat(one_request, number=number, repeat=5)) / number * 1e6
    tracing.shutdown()
    return {"off_us": round(off, 2), "on_us": round(on, 2)}


class _Collector:
    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        outer = self
        self.spans = 0

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                outer.spans += sum(
                    len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def run_stack(env: dict[str, str], requests: int, max_tokens: int) -> dict[str, float]:
    from splitserve.processes import free_port, spawn, splitserve_argv, stop

    port = free_port()
    log = open(f"/tmp/tracing-bench-{port}.log", "w")  # noqa: SIM115
    argv = splitserve_argv("serve", "--port", str(port), "--prefill-replicas", "1",
                           "--decode-replicas", "1", "--kv-cache-memory-gb", "0.5")  # fmt: skip
    proc = spawn(argv, env=env, output=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while "ready at" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(Path(log.name).read_text()[-3000:])
            time.sleep(0.25)
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        latencies, per_token = [], []
        with httpx.Client(timeout=300) as client:
            for i in range(requests + 3):  # 3 to warm up
                msgs = [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]
                t0 = time.perf_counter()
                r = client.post(url + "/v1/chat/completions", json={**body, "messages": msgs})
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 3:
                    latencies.append(dt)
                    per_token.append(dt / r.json()["usage"]["completion_tokens"])
        return {"median_ms": round(statistics.median(latencies) * 1e3, 2),
                "median_ms_per_token": round(statistics.median(per_token) * 1e3, 3)}  # fmt: skip
    finally:
        stop([proc], 30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    out: dict[str, object] = {"in_process_per_request": spans_per_request_us()}
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base["PYTHONSAFEPATH"] = "1"
    off = run_stack(base, args.requests, args.max_tokens)
    collector = _Collector()
    on_env = dict(base, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector.port}")
    on = run_stack(on_env, args.requests, args.max_tokens)
    out["stack"] = {
        "off": off,
        "on": on,
        "spans_received": collector.spans,
        "ratio_on_over_off_per_token": round(
            on["median_ms_per_token"] / off["median_ms_per_token"], 4
        ),
    }
    collector.server.stop(0)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
