"""Probe semantics (thresholds, initial results, delays); each probe kind against real servers."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.cluster.nodeagent import probes
from splitserve.cluster.nodeagent.probes import Kind, ProbeSpec, ProbeTracker, Result


def spec(**kw: object) -> ProbeSpec:
    return ProbeSpec.from_api({"tcpSocket": {"port": 1}} | kw)


def test_defaults_of_the_api() -> None:
    s = spec()
    assert (s.initial_delay_s, s.period_s, s.timeout_s) == (0, 10, 1)
    assert (s.success_threshold, s.failure_threshold) == (1, 3)


def test_initial_results_per_kind() -> None:
    assert ProbeTracker(Kind.READINESS, spec()).result == Result.FAILURE
    assert ProbeTracker(Kind.LIVENESS, spec()).result == Result.SUCCESS
    assert ProbeTracker(Kind.STARTUP, spec()).result == Result.UNKNOWN


def test_thresholds_need_consecutive_results() -> None:
    t = ProbeTracker(Kind.READINESS, spec(successThreshold=2, failureThreshold=3))
    S, F = Result.SUCCESS, Result.FAILURE
    assert [t.observe(r) for r in (S, F, S, S)] == [False, False, False, True]
    assert t.result == S
    # Two failures are not enough, a success in between restarts the count.
    assert [t.observe(r) for r in (F, F, S, F, F)] == [False, False, False, False, False]
    assert t.result == S
    assert t.observe(F) is True and t.result == F


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        code = {"/ok": 200, "/redirect": 302, "/fail": 500}.get(self.path, 404)
        if self.path == "/slow":
            time.sleep(2)
            code = 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize(
    ("path", "result"),
    [
        ("/ok", Result.SUCCESS),
        ("/redirect", Result.SUCCESS),
        ("/fail", Result.FAILURE),
        ("/slow", Result.FAILURE),
    ],
)
def test_http_probe(http_port: int, path: str, result: Result) -> None:
    s = ProbeSpec.from_api({"httpGet": {"path": path, "port": "web"}, "timeoutSeconds": 1})
    container = {"name": "c", "ports": [{"name": "web", "containerPort": http_port}]}
    got, message = probes.run_probe(s, container, "127.0.0.1", lambda a, t: (0, ""))
    assert got == result, message


def test_tcp_probe(http_port: int) -> None:
    assert probes.tcp_probe("127.0.0.1", http_port, 1)[0] == Result.SUCCESS
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probes.tcp_probe("127.0.0.1", closed, 1)[0] == Result.FAILURE


def test_grpc_probe() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probes.grpc_probe("127.0.0.1", port, "", 2)[0] == Result.SUCCESS
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result, message = probes.grpc_probe("127.0.0.1", port, "", 2)
        assert result == Result.FAILURE and "NOT_SERVING" in message
    finally:
        server.stop(0)
    assert probes.grpc_probe("127.0.0.1", port, "", 1)[0] == Result.FAILURE


def test_exec_probe_uses_the_runtime_callback() -> None:
    s = ProbeSpec.from_api({"exec": {"command": ["true"]}, "timeoutSeconds": 3})
    calls = []

    def fake_exec(argv: list[str], timeout: float) -> tuple[int | None, str]:
        calls.append((argv, timeout))
        return (0, "") if len(calls) == 1 else (None, "")

    assert probes.run_probe(s, {"name": "c"}, "", fake_exec)[0] == Result.SUCCESS
    assert probes.run_probe(s, {"name": "c"}, "", fake_exec)[0] == Result.FAILURE  # timed out
    assert calls[0] == (["true"], 3)


def test_unknown_named_port_fails_the_probe() -> None:
    s = ProbeSpec.from_api({"httpGet": {"port": "nope"}})
    result, message = probes.run_probe(s, {"name": "c"}, "127.0.0.1", lambda a, t: (0, ""))
    assert result == Result.FAILURE and "no port named" in message


def test_prober_waits_initial_delay_and_startup_gates_liveness() -> None:
    results = iter([Result.FAILURE] * 100)
    seen: list[tuple[Kind, Result]] = []
    started = threading.Event()
    ran = []

    def run_once() -> tuple[Result, str]:
        ran.append(time.monotonic())
        return next(results), "down"

    s = ProbeSpec.from_api(
        {
            "tcpSocket": {"port": 1},
            "periodSeconds": 1,
            "failureThreshold": 2,
            "initialDelaySeconds": 1,
        }
    )
    began = time.monotonic()
    p = probes.Prober(
        Kind.LIVENESS, s, run_once, time.time(), started.is_set, lambda k, r, m: seen.append((k, r))
    ).start()
    time.sleep(1.5)
    assert not ran  # not started yet: liveness waits for the startup probe
    started.set()
    deadline = time.monotonic() + 6
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    p.stop()
    assert seen == [(Kind.LIVENESS, Result.FAILURE)]
    assert len(ran) == 2 and ran[0] - began >= 1.0  # two failures in a row, one period apart
    time.sleep(1.2)
    assert len(ran) == 2  # held after a liveness failure: the container gets restarted
