"""Fixtures for the router tests: a fake engine pod (gRPC, no model) and a router in a thread.

The fake pod speaks the real proto (GetInfo / Prefill / Generate / Abort / GetStats /
SubscribeKVEvents), reports the default model's real tokenizer files, stores prompt blocks with
the engine's own block hash and publishes them as KV events, and can be told to fail, so routing,
retries, aborts and the HTTP layer are tested in seconds. Tests against real engine processes
live in test_e2e_*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn

from splitserve.engine.model.loader import resolve_model
from splitserve.processes import free_port, spawn, splitserve_argv
from splitserve.processes import stop as stop_processes
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.block_hash import hash_prompt_blocks
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.tokenizer_files import read_tokenizer_files, tokenizer_id
from splitserve.services.router.main import RouterSettings, build_router, static_discovery
from splitserve.services.router.tokenizer import RouterTokenizer

BLOCK_SIZE = 16
VOCAB_SIZE = 49152
MAX_MODEL_LEN = 8192


class LoopThread:
    """An asyncio loop in a daemon thread, for servers the (sync) tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class FakeEngine:
    """A scripted pod. Output token i of a request is ``100 + (sum(prompt) + i) % 500``."""

    role: str  # "prefill" | "decode" | "colocated"
    token_delay_s: float = 0.0
    fail_after_tokens: int | None = None  # Generate dies (UNAVAILABLE) after this many tokens
    fail_prefill: bool = False
    stats_fail: bool = False
    not_serving: str = ""  # a health reason: the pod says it cannot serve
    kv_compat_hash: str = "kv-1"
    max_model_len: int = MAX_MODEL_LEN
    blocks: set[int] = field(default_factory=set)
    prefills: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    heads: list[tuple[int, ...]] = field(default_factory=list)  # first 32 tokens of each prompt
    generates: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    prefill_aborted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    running: int = 0
    queries: int = 0
    hits: int = 0
    _subscribers: list[asyncio.Queue] = field(default_factory=list)
    _seq: int = 0

    # -- behaviour --

    def _cache(self, prompt: list[int], extra: list[str]) -> int:
        """Store the prompt's full blocks; returns the prompt tokens that were already cached."""
        hashes = hash_prompt_blocks(prompt, BLOCK_SIZE, extra)
        hit = 0
        for h in hashes:
            if h not in self.blocks:
                break
            hit += 1
        new = [h for h in hashes if h not in self.blocks]
        self.blocks.update(new)
        self.queries += len(prompt)
        self.hits += hit * BLOCK_SIZE
        if new:
            self._publish(
                pb.KVEvent(stored=pb.BlockStored(block_hashes=new, block_size=BLOCK_SIZE))
            )
        return hit * BLOCK_SIZE

    def _publish(self, event: pb.KVEvent) -> None:
        self._seq += 1
        batch = pb.KVEventBatch(engine_id=self.role, epoch=7, sequence=self._seq, events=[event])
        for q in self._subscribers:
            q.put_nowait(batch)

    def evict_all(self) -> None:
        self._publish(pb.KVEvent(removed=pb.BlockRemoved(block_hashes=list(self.blocks))))
        self.blocks.clear()

    @staticmethod
    def token(prompt: list[int], i: int) -> int:
        return 100 + (sum(prompt) + i) % 500


class FakeServicer(pb_grpc.DecodeServiceServicer, pb_grpc.EngineServiceServicer):
    def __init__(self, engine: FakeEngine) -> None:
        self.e = engine

    async def GetInfo(self, request, context):
        files = _default_tokenizer_files()
        return pb.EngineInfo(
            protocol_version=PROTOCOL_VERSION,
            engine_id=self.e.role,
            epoch=7,
            role=self.e.role,
            served_model_name="m",
            max_model_len=self.e.max_model_len,
            vocab_size=VOCAB_SIZE,
            block_size=BLOCK_SIZE,
            kv_compat_hash=self.e.kv_compat_hash,
            tokenizer_id=tokenizer_id(files),
            tokenizer_files=[pb.TokenizerFile(name=n, content=c) for n, c in files],
        )

    async def Prefill(self, request, context):
        e = self.e
        e.prefills.append(request.request_id)
        sp = request.sampling_params
        e.seeds.append(sp.seed if sp.HasField("seed") else None)
        if e.fail_prefill:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake prefill failure")
        prompt = list(request.prompt_token_ids)
        e.heads.append(tuple(prompt[:32]))
        cached = e._cache(prompt, list(request.extra_keys))
        n = sp.n if sp.HasField("n") else 1
        return pb.PrefillResponse(
            first_tokens=[
                pb.FirstToken(token_id=FakeEngine.token(prompt, 7 * i)) for i in range(n)
            ],
            num_cached_tokens=cached,
            num_prompt_tokens=len(prompt),
            handoff=pb.KVHandoff(request_id=request.request_id, engine_id=e.role),
        )

    async def Generate(self, request, context):
        e = self.e
        req = request.request
        rid = req.request_id
        e.generates.append(rid)
        prompt = list(req.prompt_token_ids)
        sp = req.sampling_params
        if sp.HasField("temperature") and sp.temperature < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0")
        if request.HasField("prefill"):
            cached = request.prefill.num_cached_tokens
        else:
            e.heads.append(tuple(prompt[:32]))
            cached = e._cache(prompt, list(req.extra_keys))
        max_tokens = sp.max_tokens if sp.HasField("max_tokens") else 16
        if sp.max_tokens_unbounded:
            max_tokens = 20
        n = sp.n if sp.HasField("n") else 1
        e.running += 1
        try:
            live = set(range(n))  # sample j's token k is token(prompt, k + 7 * j)
            for k in range(max_tokens):
                if e.fail_after_tokens is not None and k >= e.fail_after_tokens:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake pod died")
                if e.token_delay_s:
                    await asyncio.sleep(e.token_delay_s)
                for j in sorted(live):
                    msg = self._message(rid, j, prompt, k, max_tokens, sp, cached)
                    if msg.finish_reason:
                        live.discard(j)
                    yield msg
                if not live:
                    return
        except asyncio.CancelledError:
            e.cancelled.append(rid)
            raise
        finally:
            e.running -= 1

    @staticmethod
    def _message(rid, j, prompt, k, max_tokens, sp, cached) -> pb.GenerateResponse:
        tok = FakeEngine.token(prompt, k + 7 * j)
        text = f" w{tok}"
        finish = pb.FINISH_REASON_UNSPECIFIED
        stop_hit = next((s for s in sp.stop if s in text), None)
        if stop_hit is not None:
            text = text[: text.index(stop_hit)]
            finish = pb.FINISH_REASON_STOP
        elif k == max_tokens - 1:
            finish = pb.FINISH_REASON_LENGTH
        msg = pb.GenerateResponse(
            request_id=rid, index=j, token_ids=[tok], text=text, finish_reason=finish
        )
        if sp.HasField("logprobs"):
            msg.logprobs.append(
                pb.TokenLogprobs(
                    token_id=tok,
                    logprob=-0.5,
                    rank=1,
                    top=[pb.TopLogprob(token_id=tok, logprob=-0.5, rank=1)][: sp.logprobs],
                )
            )
        if finish:
            msg.usage.CopyFrom(
                pb.Usage(prompt_tokens=len(prompt), completion_tokens=k + 1, cached_tokens=cached)
            )
        return msg

    async def Abort(self, request, context):
        self.e.aborted.extend(request.request_ids)
        return pb.AbortResponse(num_aborted=len(request.request_ids))

    async def GetStats(self, request, context):
        e = self.e
        if e.stats_fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return pb.EngineStats(
            engine_id=e.role,
            epoch=7,
            serving=not e.not_serving,
            health_reason=e.not_serving,
            role=e.role,
            num_requests_running=e.running,
            block_size=BLOCK_SIZE,
            prefix_cache_queries=e.queries,
            prefix_cache_hits=e.hits,
        )

    async def SubscribeKVEvents(self, request, context):
        e = self.e
        q: asyncio.Queue = asyncio.Queue()
        e._subscribers.append(q)
        try:
            if request.snapshot:
                e._seq += 1
                yield pb.KVEventBatch(
                    engine_id=e.role,
                    epoch=7,
                    sequence=e._seq,
                    snapshot=True,
                    events=[
                        pb.KVEvent(cleared=pb.AllCleared()),
                        pb.KVEvent(stored=pb.BlockStored(block_hashes=list(e.blocks))),
                    ],
                )
            while True:
                yield await q.get()
        finally:
            e._subscribers.remove(q)


class FakePrefillService(pb_grpc.PrefillServiceServicer):
    """PrefillService of a fake pod (its Abort is told apart from DecodeService.Abort)."""

    def __init__(self, servicer: FakeServicer) -> None:
        self.s = servicer

    async def Prefill(self, request, context):
        return await self.s.Prefill(request, context)

    async def Abort(self, request, context):
        self.s.e.prefill_aborted.extend(request.request_ids)
        return pb.AbortResponse(num_aborted=len(request.request_ids))


_TOKENIZER_FILES: list[tuple[str, bytes]] = []


def _default_tokenizer_files() -> list[tuple[str, bytes]]:
    if not _TOKENIZER_FILES:
        _TOKENIZER_FILES.extend(read_tokenizer_files(resolve_model(None)))
    return _TOKENIZER_FILES


@dataclass
class FakePod:
    engine: FakeEngine
    address: str
    server: grpc.aio.Server


async def start_fake(role: str, **kw) -> FakePod:
    engine = FakeEngine(role, **kw)
    server = grpc.aio.server()
    servicer = FakeServicer(engine)
    pb_grpc.add_PrefillServiceServicer_to_server(FakePrefillService(servicer), server)
    pb_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    pb_grpc.add_EngineServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return FakePod(engine, f"127.0.0.1:{port}", server)


class RouterThread:
    """A router (uvicorn) on a free port in a background thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("router did not start")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("router never became ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer, as the router loads it from the engines' files."""
    return RouterTokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def grpc_loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


@contextlib.contextmanager
def fake_stack(
    loop: LoopThread,
    tokenizer,
    roles: list[str],
    settings: RouterSettings | None = None,
    **engine_kw,
) -> Iterator[tuple[RouterThread, list[FakePod]]]:
    """Fake pods of the given roles and a router over them."""
    pods = [loop.call(start_fake(role, **engine_kw)) for role in roles]
    by_role: dict[str, list[str]] = {"prefill": [], "decode": [], "colocated": []}
    for pod in pods:
        by_role[pod.engine.role].append(pod.address)
    settings = settings or RouterSettings(served_names=("m",), stats_interval_s=0.1)
    app = build_router(
        settings, static_discovery(by_role["prefill"], by_role["decode"], by_role["colocated"])
    )
    router = RouterThread(app)
    try:
        router.wait_ready()
        yield router, pods
    finally:
        router.stop()
        for pod in pods:
            loop.call(pod.server.stop(None))


@pytest.fixture(scope="session")
def stack_factory(grpc_loop, tokenizer):
    """``with stack_factory(["prefill", "decode"]) as (router, pods): ...``"""

    def make(roles: list[str], settings: RouterSettings | None = None, **engine_kw):
        return fake_stack(grpc_loop, tokenizer, roles, settings, **engine_kw)

    return make


@pytest.fixture
def fake_pods(grpc_loop):
    """``fake_pods(["prefill", "decode"]) -> [FakePod, ...]`` (stopped after the test)."""
    started: list[FakePod] = []

    def make(roles: list[str], **engine_kw) -> list[FakePod]:
        pods = [grpc_loop.call(start_fake(role, **engine_kw)) for role in roles]
        started.extend(pods)
        return pods

    yield make
    for pod in started:
        grpc_loop.call(pod.server.stop(None))


@pytest.fixture(scope="module")
def disagg(stack_factory):
    """One fake prefill pod and one fake decode pod behind a router (shared by a module)."""
    with stack_factory(["prefill", "decode"]) as (router, pods):
        yield router, pods


# ---- real processes -----------------------------------------------------------------------------


@dataclass
class ServeStack:
    """A running `splitserve serve` (router + engine processes)."""

    url: str
    proc: subprocess.Popen
    engines: dict[str, tuple[int, int]]  # name -> (grpc port, metrics port)
    log: Path

    def engine_metrics(self, name: str) -> dict[str, float]:
        """The engine's Prometheus samples (name{labels} -> value)."""
        text = httpx.get(f"http://127.0.0.1:{self.engines[name][1]}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self) -> int:
        stop_processes([self.proc], 30)
        return self.proc.returncode


ENGINE_TEST_FLAGS = ["--kv-cache-memory-gb", "0.25"]


def start_serve(args: list[str], log: Path, timeout: float = 420.0) -> ServeStack:
    """`splitserve serve ARGS` on a free port; waits for its "ready at" line."""
    port = free_port()
    proc = spawn(splitserve_argv("serve", "--port", str(port), *args), output=log.open("w"))
    deadline = time.monotonic() + timeout
    engines: dict[str, tuple[int, int]] = {}
    while True:
        text = log.read_text()
        if "ready at" in text:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"splitserve serve failed to start:\n{text[-4000:]}")
        time.sleep(0.25)
    for m in re.finditer(r"(\w+-\d+) grpc:(\d+) metrics:(\d+)", text):
        engines[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return ServeStack(f"http://127.0.0.1:{port}", proc, engines, log)


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory) -> Iterator[ServeStack]:
    """One prefill and one decode engine process behind a router (shared by a module)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    stack = start_serve(
        ["--prefill-replicas", "1", "--decode-replicas", "1", *ENGINE_TEST_FLAGS], log
    )
    yield stack
    assert stack.stop() == 0, log.read_text()[-3000:]
    # SIGTERM to `serve` stopped every child: no engine port still accepts connections.
    for name, (grpc_port, _) in stack.engines.items():
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(1)
            s.connect(("127.0.0.1", grpc_port))
            pytest.fail(f"{name} still listens on {grpc_port}")


@pytest.fixture(scope="session")
def serve_factory(tmp_path_factory):
    """``serve_factory(args) -> ServeStack``; the caller stops it (module fixtures do)."""

    def make(args: list[str]) -> ServeStack:
        log = tmp_path_factory.mktemp("serve") / "serve.log"
        return start_serve([*ENGINE_TEST_FLAGS, *args], log)

    return make


@dataclass
class Proc:
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        stop_processes([self.proc], 20)


def wait_health(url: str, timeout: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became healthy")


@pytest.fixture(scope="session")
def router_factory(tmp_path_factory):
    """``router_factory(args) -> Proc``: a `splitserve router` process on a free port, healthy."""
    started: list[Proc] = []

    def make(args: list[str]) -> Proc:
        port = free_port()
        log = (tmp_path_factory.mktemp("router") / "router.log").open("w")
        proc = spawn(splitserve_argv("router", "--port", str(port), *args), output=log)
        p = Proc(f"http://127.0.0.1:{port}", proc)
        started.append(p)
        wait_health(p.url, proc=proc)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory):
    """``engine_factory(role, *flags) -> (Proc, grpc address, metrics port)``; stopped after."""
    started: list[Proc] = []

    def make(role: str, *flags: str) -> tuple[Proc, str, int]:
        port, mport = free_port(), free_port()
        log = (tmp_path_factory.mktemp(role) / "engine.log").open("w")
        argv = splitserve_argv(role, "--host", "127.0.0.1", "--port", str(port))
        argv += ["--metrics-port", str(mport), *ENGINE_TEST_FLAGS, *flags]
        proc = spawn(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), output=log)
        p = Proc(f"http://127.0.0.1:{mport}", proc)
        started.append(p)
        return p, f"127.0.0.1:{port}", mport

    yield make
    for p in started:
        p.stop()
