"""`splitserve serve`: router, prefill and decode processes on 127.0.0.1, one command.

Starts the engine servers (``splitserve prefill`` / ``splitserve decode``, or ``decode --colocated``
with ``--colocated``) and a router over them as child processes, prints the URL once the router's
``/health`` says the pools are ready, and stops every child on Ctrl-C / SIGTERM (or when any child
dies, since a half stack would only confuse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address")
    p.add_argument("--port", type=int, default=8000, help="router HTTP port")
    p.add_argument("--prefill-replicas", type=int, default=1)
    p.add_argument("--decode-replicas", type=int, default=1)
    p.add_argument("--colocated", action="store_true",
                   help="engines do prefill and decode themselves (no KV transfer)")  # fmt: skip
    p.add_argument("--kv-transport", choices=("nixl", "grpc"), default="grpc")
    p.add_argument("--policy", default="prefix",
                   choices=("prefix", "round_robin", "least_load", "session"))  # fmt: skip
    p.add_argument("--served-name", default=None)
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--threads-per-engine", type=int, default=None,
                   help="torch threads per engine (default: cores / engines, >= 1)")  # fmt: skip
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="warning")


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]
    port: int
    metrics_port: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan(args: argparse.Namespace) -> tuple[list[Child], Child]:
    """The engine children and the router child (argv without the interpreter prefix)."""
    engine_flags: list[str] = ["--host", "127.0.0.1", "--log-level", args.log_level.upper()]
    if args.model:
        engine_flags += ["--model", args.model]
    for flag, value in (
        ("--dtype", args.dtype),
        ("--max-model-len", args.max_model_len),
        ("--max-num-seqs", args.max_num_seqs),
        ("--block-size", args.block_size),
        ("--kv-cache-memory-gb", args.kv_cache_memory_gb),
    ):
        if value is not None:
            engine_flags += [flag, str(value)]
    engines: list[Child] = []

    def engine(role: str, i: int, extra: list[str]) -> Child:
        port, mport = free_port(), free_port()
        argv = [role, *engine_flags, "--port", str(port), "--metrics-port", str(mport)]
        argv += ["--engine-id", f"{role}-{i}", "--kv-transport", args.kv_transport, *extra]
        return Child(f"{role}-{i}", argv, port, mport)

    router = ["router", "--host", args.host, "--port", str(args.port), "--policy", args.policy]
    router += ["--log-level", args.log_level]
    if args.colocated:
        n = max(1, args.decode_replicas)
        engines = [engine("decode", i, ["--colocated"]) for i in range(n)]
        router += ["--colocated-endpoints", ",".join(f"127.0.0.1:{c.port}" for c in engines)]
    else:
        pre = [engine("prefill", i, []) for i in range(args.prefill_replicas)]
        dec = [engine("decode", i, []) for i in range(args.decode_replicas)]
        engines = pre + dec
        router += ["--prefill-endpoints", ",".join(f"127.0.0.1:{c.port}" for c in pre)]
        router += ["--decode-endpoints", ",".join(f"127.0.0.1:{c.port}" for c in dec)]
    if args.model:
        router += ["--model", args.model]
    if args.served_name:
        router += ["--served-name", args.served_name]
    if args.max_model_len:
        router += ["--max-model-len", str(args.max_model_len)]
    for key in args.api_key:
        router += ["--api-key", key]
    return engines, Child("router", router, args.port)


class Stack:
    """The running children; ``stop`` is idempotent and kills what does not exit in time."""

    def __init__(self) -> None:
        self.procs: list[tuple[Child, subprocess.Popen]] = []

    def start(self, child: Child, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-P", "-m", "splitserve", *child.argv]
        # Own session: a terminal Ctrl-C reaches only us, and we stop the children in order.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.procs.append((child, proc))

    def dead(self) -> tuple[Child, int] | None:
        for child, proc in self.procs:
            if proc.poll() is not None:
                return child, proc.returncode
        return None

    def stop(self, timeout: float = 15.0) -> None:
        # Router first (no new requests), then engines.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _all_ready(url: str, prefill: int, decode: int) -> bool:
    """The router is healthy AND sees every engine: "ready" means the whole stack is."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            body = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return body.get("prefill_pods", 0) >= prefill and body.get("decode_pods", 0) >= decode


def child_env(num_engines: int, threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if "OMP_NUM_THREADS" not in env or threads:
        # Engines share the machine: oversubscribed torch threads spin against each other.
        per = threads or max(1, (os.cpu_count() or 1) // max(1, num_engines))
        env["OMP_NUM_THREADS"] = str(per)
    return env


def run(args: argparse.Namespace) -> int:
    if args.prefill_replicas < 1 or args.decode_replicas < 1:
        print("serve: --prefill-replicas and --decode-replicas must be >= 1", file=sys.stderr)
        return 2
    # Convert the default model once here, not in every child at the same time.
    from splitserve.engine.model.loader import resolve_model

    resolve_model(args.model)
    engines, router = plan(args)
    stack = Stack()
    stopping = []

    def on_signal(signum: int, _frame) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    try:
        env = child_env(len(engines), args.threads_per_engine)
        for child in engines:
            stack.start(child, env)
        stack.start(router, dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1"))
        print(f"splitserve: starting {len(engines)} engine(s) and the router ...", flush=True)
        deadline = time.monotonic() + args.ready_timeout
        n_prefill = len(engines) if args.colocated else args.prefill_replicas
        n_decode = len(engines) if args.colocated else args.decode_replicas
        while not _all_ready(url, n_prefill, n_decode):
            if stopping:
                return 130
            if (dead := stack.dead()) is not None:
                print(f"splitserve: {dead[0].name} exited with {dead[1]}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("splitserve: the stack did not become ready in time", file=sys.stderr)
                return 1
            time.sleep(0.25)
        ports = ", ".join(f"{c.name} grpc:{c.port} metrics:{c.metrics_port}" for c in engines)
        print(f"splitserve: engines {ports}", flush=True)
        print(f"splitserve: ready at {url}/v1 (Ctrl-C to stop)", flush=True)
        while not stopping:
            if (dead := stack.dead()) is not None:
                print(f"splitserve: {dead[0].name} exited with {dead[1]}", file=sys.stderr)
                return 1
            time.sleep(0.25)
        return 0
    finally:
        print("splitserve: stopping ...", file=sys.stderr, flush=True)
        stack.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
