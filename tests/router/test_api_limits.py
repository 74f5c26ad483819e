"""Limits the router enforces itself, through its real HTTP server (``http_server.py``): bodies
cut off at the limit while they stream in (chunked or not), 414 / 431 / malformed HTTP answered
as OpenAI JSON, /health responsive while maximal prompts are tokenized, and the router's memory
back near idle after a burst of large requests."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from splitserve.processes import free_port, spawn, splitserve_argv, stop
from splitserve.services.router import http_server
from splitserve.services.router.guard import Limits
from splitserve.services.router.main import RouterSettings, build_router, static_discovery


@pytest.fixture(scope="module")
def served(fake_pods_module):
    """A router on its production HTTP server (guarded protocol), over fake pods."""
    prefill, decode = fake_pods_module
    settings = RouterSettings(served_names=("m",), stats_interval_s=0.1)
    app = build_router(settings, static_discovery([prefill.address], [decode.address], []))
    port = free_port()
    server = __import__("uvicorn").Server(
        http_server.config(app, "127.0.0.1", port, Limits(max_body_bytes=settings.max_body_bytes))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "router never became ready"
        time.sleep(0.05)
    yield url, port
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def fake_pods_module(grpc_loop):
    from splitserve.services.router import main  # noqa: F401 - loads the router before pods

    cf = _conftest()
    pods = [grpc_loop.call(cf.start_fake(role)) for role in ("prefill", "decode")]
    yield pods
    for pod in pods:
        grpc_loop.call(pod.server.stop(None))


def _conftest():
    import sys
    from pathlib import Path

    here = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == here)


def _raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("path 100 KB", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        ("header 100 KB", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
         + b"\r\n\r\n", 431),
        ("1000 headers", b"GET /health HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: v\r\n" % i for i in range(1000)) + b"\r\n", 431),
        ("Content-Length shorter than the body", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
         b"Content-Type: application/json\r\nContent-Length: 5\r\n\r\n"
         b'{"model": "m", "prompt": "x"}', 400),
        ("garbage request line", b"\x00\x01\x02 garbage\r\n\r\n", 400),
    ],
)  # fmt: skip
def test_malformed_http_is_answered_in_the_openai_shape(served, name, data, status):
    _, port = served
    got, headers, body = _raw(port, data)
    if status == 400 and got == 400 and not body.startswith(b"{"):
        pytest.fail(f"{name}: plain-text 400 {body[:80]!r}")
    assert got == status, (name, body[:200])
    assert headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}


def test_a_chunked_body_past_the_limit_is_refused_as_it_arrives(served):
    """300 MB sent chunked: 413 as soon as the 8 MiB limit is passed, not after reading it all."""
    url, _ = served
    sent = [0]

    def body():
        chunk = b"x" * (1 << 20)
        yield b'{"model": "m", "prompt": "'
        for _ in range(300):
            sent[0] += len(chunk)
            yield chunk

    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/completions", content=body(), timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    except httpx.HTTPError:
        pass  # the server closed the connection after its 413, while the client still sent
    assert time.perf_counter() - t0 < 10
    assert sent[0] < 100 << 20, f"{sent[0] >> 20} MB went out before the refusal"


# ---- a router process: the event loop stays free, memory comes back -----------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def router_process(fake_pods_module, tmp_path_factory):
    prefill, decode = fake_pods_module
    port = free_port()
    argv = splitserve_argv(
        "router", "--port", str(port), "--stats-interval", "0.1",
        "--prefill-endpoints", prefill.address, "--decode-endpoints", decode.address,
    )  # fmt: skip
    log = (tmp_path_factory.mktemp("router") / "router.log").open("w")
    proc = spawn(argv, output=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "router exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
    yield url, proc
    stop([proc])


def _health_latency_during(url: str, body: bytes, path: str = "/v1/completions") -> list[float]:
    lat: list[float] = []
    done = threading.Event()
    status: list[int] = []

    def send() -> None:
        r = httpx.post(url + path, content=body, timeout=120,
                       headers={"content-type": "application/json"})  # fmt: skip
        status.append(r.status_code)
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    with httpx.Client(timeout=10) as c:
        while not done.is_set() or not lat:
            t = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            lat.append(time.perf_counter() - t)
            time.sleep(0.005)
    thread.join()
    assert status == [400]  # over the context either way
    return lat


@pytest.mark.slow
def test_health_stays_fast_while_maximal_prompts_are_tokenized(router_process):
    url, _ = router_process
    maximal = {
        # Past any context at first sight (bytes / longest token): refused before tokenizing.
        "7.5 MB prompt": ("/v1/completions", {"model": "m", "prompt": "hello world. " * 600_000}),
        # Just under that bound: tokenized whole (seconds of CPU, on a worker).
        "660 KB whitespace": ("/v1/completions", {"model": "m", "prompt": " " * 660_000}),
        "600 KB chat": ("/v1/chat/completions",
                        {"model": "m", "messages": [{"role": "user", "content": " " * 600_000}]}),
    }  # fmt: skip
    lat: list[float] = []
    for path, body in maximal.values():
        lat += _health_latency_during(url, json.dumps(body).encode(), path)
    # The loop only parses the body (~10 ms for 7.5 MB) while a worker tokenizes: /health
    # answers in a few ms. The bounds leave room for a machine shared with other jobs.
    assert len(lat) > 50
    assert statistics.quantiles(lat, n=20)[-1] < 0.05 and max(lat) < 0.5, sorted(lat)[-5:]


@pytest.mark.slow
def test_router_memory_returns_near_idle_after_a_burst(router_process):
    url, proc = router_process
    httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "warm", "max_tokens": 2})
    idle = _rss_mb(proc.pid)
    bodies = [
        json.dumps({"model": "m", "prompt": "hello world. " * 600_000}).encode(),
        json.dumps({"model": "m", "prompt": " " * 660_000}).encode(),
    ]

    def post(body: bytes) -> None:
        httpx.post(url + "/v1/completions", content=body, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip

    threads = [threading.Thread(target=post, args=(b,)) for b in bodies for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2)
    after = _rss_mb(proc.pid)
    assert after < idle + 100, f"RSS {idle:.0f} MB idle, {after:.0f} MB after the burst"
