"""`splitserve serve`: router, prefill and decode processes on 127.0.0.1, one command.

Starts the engine servers (``splitserve prefill`` / ``splitserve decode``, or ``decode --colocated``
with ``--colocated``) and a router over them as child processes, prints the URL once the router's
``/health`` says the pools are ready, and stops every child on Ctrl-C / SIGTERM (or when any child
dies, since a half stack would only confuse).

It fails fast and plainly: a port that is taken, a model that cannot be loaded or a bad flag is
one line on stderr and exit status 2, before any child starts. "ready" is printed only when the
router that answers /health is the one this command started (its instance id). Children die with
this process even when it is SIGKILLed (``splitserve.processes``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from splitserve.observability.logs import LOG_FORMATS
from splitserve.processes import free_port, port_in_use, spawn, splitserve_argv, stop
from splitserve.protocol.constants import API_KEYS_ENV, ROUTER_HTTP_PORT
from splitserve.protocol.kv_compat import QUANTIZATIONS


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="router bind address")
    p.add_argument("--port", type=_port, default=ROUTER_HTTP_PORT, help="router HTTP port")
    p.add_argument("--prefill-replicas", type=_positive, default=1)
    p.add_argument("--decode-replicas", type=_positive, default=1)
    p.add_argument("--colocated", action="store_true",
                   help="engines do prefill and decode themselves (no KV transfer)")  # fmt: skip
    p.add_argument("--kv-transport", choices=("nixl", "grpc"), default="grpc")
    p.add_argument("--policy", default="prefix",
                   choices=("prefix", "round_robin", "least_load", "session"))  # fmt: skip
    p.add_argument("--served-name", action="append", default=None,
                   help="model name clients send (repeatable: the first is reported, the others "
                   "are aliases; default: the model's hub id, and its short name)")  # fmt: skip
    p.add_argument("--api-key-file", default=None,
                   help=f"file of accepted API keys, one per line, re-read when it changes "
                   f"(or ${API_KEYS_ENV}=k1,k2); keys never go on a command line")  # fmt: skip
    # A key on a command line is readable by every user of the machine (ps, /proc/PID/cmdline):
    # the flag is refused with what to use instead, rather than silently accepted.
    p.add_argument("--api-key", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATIONS,
        help="weights stay quantized in every engine (docs/quantization.md)",
    )
    p.add_argument("--max-model-len", type=_positive, default=None)
    p.add_argument("--max-num-seqs", type=_positive, default=None)
    p.add_argument("--block-size", type=_positive, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--threads-per-engine", type=_positive, default=None,
                   help="torch threads per engine (default: cores / engines, >= 1)")  # fmt: skip
    p.add_argument("--enable-lora", action="store_true", help="engines serve LoRA adapters")
    p.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters every engine loads at start (implies --enable-lora)",
    )
    p.add_argument("--max-loras", type=_positive, default=None)
    p.add_argument("--max-lora-rank", type=_positive, default=None)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text or JSON lines, for every process started")  # fmt: skip


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]
    port: int
    metrics_port: int = 0


def plan(args: argparse.Namespace, instance_id: str = "") -> tuple[list[Child], Child]:
    """The engine children and the router child (argv without the interpreter prefix)."""
    engine_flags: list[str] = ["--host", "127.0.0.1", "--log-level", args.log_level.upper()]
    engine_flags += ["--log-format", args.log_format]
    if args.model:
        engine_flags += ["--model", args.model]
    for flag, value in (
        ("--dtype", args.dtype),
        ("--quantization", args.quantization),
        ("--max-model-len", args.max_model_len),
        ("--max-num-seqs", args.max_num_seqs),
        ("--block-size", args.block_size),
        ("--kv-cache-memory-gb", args.kv_cache_memory_gb),
        ("--max-loras", args.max_loras),
        ("--max-lora-rank", args.max_lora_rank),
    ):
        if value is not None:
            engine_flags += [flag, str(value)]
    if args.enable_lora or args.lora_modules:
        engine_flags += ["--enable-lora"]
    if args.lora_modules:
        engine_flags += ["--lora-modules", *args.lora_modules]
    engines: list[Child] = []

    def engine(role: str, i: int, extra: list[str]) -> Child:
        port, mport = free_port(), free_port()
        argv = [role, *engine_flags, "--port", str(port), "--metrics-port", str(mport)]
        argv += ["--engine-id", f"{role}-{i}", "--kv-transport", args.kv_transport, *extra]
        return Child(f"{role}-{i}", argv, port, mport)

    router = ["router", "--host", args.host, "--port", str(args.port), "--policy", args.policy]
    router += ["--log-level", args.log_level, "--log-format", args.log_format]
    router += ["--instance-id", instance_id]
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
    for name in args.served_name or ():
        router += ["--served-name", name]
    if args.api_key_file:
        router += ["--api-key-file", os.path.abspath(args.api_key_file)]
    if args.max_model_len:
        router += ["--max-model-len", str(args.max_model_len)]
    # API keys reach the router as a file path or in its environment ($SPLITSERVE_API_KEYS,
    # inherited), never on its command line, where any user of the machine could read them.
    return engines, Child("router", router, args.port)


def router_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")


class Stack:
    """The running children; ``stop`` is idempotent and kills what does not exit in time."""

    def __init__(self) -> None:
        self.procs: list[tuple[Child, subprocess.Popen]] = []

    def start(self, child: Child, env: dict[str, str]) -> None:
        self.procs.append((child, spawn(splitserve_argv(*child.argv), env=env)))

    def dead(self) -> tuple[Child, int] | None:
        for child, proc in self.procs:
            if proc.poll() is not None:
                return child, proc.returncode
        return None

    def stop(self, timeout: float = 15.0) -> None:
        # Router first (no new requests), then engines.
        stop([proc for _, proc in reversed(self.procs)], timeout)


def _all_ready(url: str, prefill: int, decode: int, instance_id: str) -> bool:
    """OUR router is healthy AND sees every engine: "ready" means the whole stack is."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            body = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return (
        body.get("instance_id") == instance_id
        and body.get("prefill_pods", 0) >= prefill
        and body.get("decode_pods", 0) >= decode
    )


def preflight(args: argparse.Namespace) -> str | None:
    """Why the stack cannot start (one line), or None. Checks what children would die of."""
    if args.api_key:
        return (
            "--api-key would show the key to every user of this machine (ps): put the keys "
            f"in a file (--api-key-file PATH, one per line) or in ${API_KEYS_ENV}=k1,k2"
        )
    if args.api_key_file and not os.path.isfile(args.api_key_file):
        return f"--api-key-file {args.api_key_file}: no such file"
    if port_in_use(args.host, args.port):
        return f"port {args.port} on {args.host} is already in use (choose another with --port)"
    # Convert the default model once here, not in every child at the same time.
    from splitserve.engine.model.loader import resolve_model

    try:
        resolve_model(args.model)
    except (ValueError, OSError) as exc:
        return f"cannot load model {args.model!r}: {exc}"
    from splitserve.services.common.lora import LoRAModule

    for text in args.lora_modules:
        try:
            LoRAModule.parse(text)
        except ValueError as exc:
            return str(exc)
    return None


def child_env(num_engines: int, threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if "OMP_NUM_THREADS" not in env or threads:
        # Engines share the machine: oversubscribed torch threads spin against each other.
        per = threads or max(1, (os.cpu_count() or 1) // max(1, num_engines))
        env["OMP_NUM_THREADS"] = str(per)
    return env


def _say(args: argparse.Namespace, text: str, error: bool = False, stderr: bool = False) -> None:
    """One status line of ``serve`` itself: ``splitserve: ...``, or a JSON line like the
    children's with ``--log-format json`` (stdout; errors on stderr)."""
    stream = sys.stderr if error or stderr else sys.stdout
    if args.log_format == "json":
        record = {"timestamp": datetime.now(UTC).isoformat(), "level": "ERROR" if error else "INFO",
                  "logger": "splitserve.serve", "message": text, "request_id": None,
                  "role": "serve", "engine_id": None}  # fmt: skip
        print(json.dumps(record), file=stream, flush=True)
    else:
        print(f"splitserve: {text}", file=stream, flush=True)


def run(args: argparse.Namespace) -> int:
    problem = preflight(args)
    if problem is not None:
        _say(args, f"serve: {problem}", error=True)
        return 2
    instance_id = uuid.uuid4().hex
    engines, router = plan(args, instance_id)
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
        stack.start(router, router_env(args))
        _say(args, f"starting {len(engines)} engine(s) and the router ...")
        deadline = time.monotonic() + args.ready_timeout
        n_prefill = len(engines) if args.colocated else args.prefill_replicas
        n_decode = len(engines) if args.colocated else args.decode_replicas
        while not _all_ready(url, n_prefill, n_decode, instance_id):
            if stopping:
                return 130
            if (dead := stack.dead()) is not None:
                _say(args, f"{dead[0].name} exited with {dead[1]}", error=True)
                return 1
            if time.monotonic() > deadline:
                _say(args, "the stack did not become ready in time", error=True)
                return 1
            time.sleep(0.25)
        ports = ", ".join(f"{c.name} grpc:{c.port} metrics:{c.metrics_port}" for c in engines)
        _say(args, f"engines {ports}")
        _say(args, f"ready at {url}/v1 (Ctrl-C to stop)")
        while not stopping:
            if (dead := stack.dead()) is not None:
                _say(args, f"{dead[0].name} exited with {dead[1]}", error=True)
                return 1
            time.sleep(0.25)
        return 0
    finally:
        _say(args, "stopping ...", stderr=True)
        stack.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
