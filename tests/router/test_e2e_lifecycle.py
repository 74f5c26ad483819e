"""Request and process lifecycles of the real local stack (`splitserve serve`).

Clients that give up, at any stage, must leave no trace on any engine: no running or waiting
request, no held block, no lease, no block the books cannot account for; and the stack must
serve the next request at once. Before this held, ~140 aborted requests wedged the prefill pod.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import time

import grpc
import httpx
import pytest

from splitserve.processes import spawn, splitserve_argv
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "hex", "us",
)  # fmt: skip


def engine_stats(port: int) -> pb.EngineStats:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=5)


def wait_engines_idle(stack, timeout: float = 30.0) -> dict[str, pb.EngineStats]:
    """Every engine back to its idle level: nothing running, waiting, held, leased or lost."""
    deadline = time.monotonic() + timeout
    while True:
        stats = {name: engine_stats(grpc_port) for name, (grpc_port, _) in stack.engines.items()}
        busy = {
            name: s
            for name, s in stats.items()
            if s.num_requests_running
            or s.num_requests_waiting
            or s.num_active_leases
            or s.num_blocks_free != s.num_blocks_total
            or s.kv_blocks_unaccounted
            or not s.serving
        }
        if not busy:
            return stats
        if time.monotonic() > deadline:
            pytest.fail(f"engines not back to idle after {timeout} s: {busy}")
        time.sleep(0.25)


async def one_aborted(client: httpx.AsyncClient, url: str, rng: random.Random) -> str:
    """A request given up at a random moment: before headers, mid-prefill, mid-pull, mid-decode."""
    words = rng.choice([8, 40, 150, 400])
    body = {
        "model": MODEL,
        "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
        "max_tokens": rng.choice([4, 16, 32]),
        "stream": rng.random() < 0.5,
        "ignore_eos": True,
    }
    if rng.random() < 0.2:
        body["n"] = 2
    give_up = rng.choice([0.0, 0.01, 0.05, 0.15, 0.4, 0.8, 1.5, 60.0])

    async def go() -> None:
        if body["stream"]:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for _ in r.aiter_bytes():
                    pass
        else:
            (await client.post(url + "/v1/completions", json=body)).raise_for_status()

    try:
        await asyncio.wait_for(go(), give_up)
        return "done"
    except TimeoutError:
        return "aborted"


def run_aborts(url: str, count: int, seed: int, concurrency: int = 8) -> dict[str, int]:
    rng = random.Random(seed)

    async def main() -> list[str]:
        out: list[str] = []
        async with httpx.AsyncClient(timeout=None) as client:
            for start in range(0, count, concurrency):
                batch = range(start, min(count, start + concurrency))
                out += await asyncio.gather(*(one_aborted(client, url, rng) for _ in batch))
        return out

    results = asyncio.run(main())
    return {k: results.count(k) for k in set(results)}


def assert_serves_promptly(url: str, limit_s: float = 10.0) -> None:
    t0 = time.monotonic()
    r = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < limit_s


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_random_aborts_leave_every_engine_idle(serve_factory, transport):
    stack = serve_factory(["--kv-transport", transport])
    try:
        counts = run_aborts(stack.url, 100, seed={"grpc": 1, "nixl": 2}[transport])
        assert counts.get("aborted", 0) >= 40, counts  # most were given up mid-way
        wait_engines_idle(stack)
        assert_serves_promptly(stack.url)
        router_metrics = httpx.get(stack.url + "/metrics", timeout=10).text
        assert "splitserve_router_client_aborts_total" in router_metrics
    finally:
        assert stack.stop() == 0, stack.log.read_text()[-3000:]
    log = stack.log.read_text()
    assert "Traceback" not in log, log[-4000:]  # a client leaving is not an error


def test_aborts_that_would_have_filled_the_pool_do_not_wedge_it(serve_factory):
    """A pool of ~60 blocks: two leaked 700-token prompts would fill it for good."""
    stack = serve_factory(["--kv-cache-memory-gb", "0.02", "--max-model-len", "900"])
    try:
        rng = random.Random(3)

        async def main() -> None:
            async with httpx.AsyncClient(timeout=None) as client:
                for _ in range(10):
                    body = {
                        "model": MODEL,
                        "prompt": " ".join(rng.choice(WORDS) for _ in range(600)),
                        "max_tokens": 32,
                        "stream": True,
                    }

                    async def go(body=body) -> None:
                        async with client.stream(
                            "POST", stack.url + "/v1/completions", json=body
                        ) as r:
                            async for _ in r.aiter_bytes():
                                pass

                    tasks = [asyncio.create_task(go()) for _ in range(3)]
                    await asyncio.sleep(rng.choice([0.05, 0.3, 0.8]))
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
        wait_engines_idle(stack)
        assert_serves_promptly(stack.url)
    finally:
        assert stack.stop() == 0


def _serve(port: int, *args: str, log) -> subprocess.Popen:
    argv = splitserve_argv("serve", "--port", str(port), "--kv-cache-memory-gb", "0.25", *args)
    return spawn(argv, output=log)


def test_port_taken_fails_at_once_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "serve.log"
        t0 = time.monotonic()
        proc = _serve(port, log=log.open("w"))
        assert proc.wait(60) == 2
        assert time.monotonic() - t0 < 30  # before any engine loaded a model
    out = log.read_text().strip()
    assert out.count("\n") == 0 and "already in use" in out and str(port) in out, out
    assert "ready at" not in out


def test_a_wrong_model_is_one_line_and_exit_2(tmp_path):
    log = tmp_path / "serve.log"
    proc = spawn(splitserve_argv("serve", "--model", str(tmp_path / "nope")), output=log.open("w"))
    assert proc.wait(60) == 2
    out = log.read_text().strip()
    assert out.count("\n") == 0 and "cannot load model" in out, out


def test_sigkill_of_serve_leaves_no_process_behind(tmp_path):
    from splitserve.processes import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(port, log=log.open("w"))
    deadline = time.monotonic() + 420
    while "ready at" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.25)
    children = _children_of(proc.pid)
    assert len(children) == 3, children  # prefill, decode, router
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 30
    while alive := [pid for pid in children if _alive(pid)]:
        assert time.monotonic() < deadline, f"children outlived serve: {alive}"
        time.sleep(0.2)


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
