"""Real prefill / decode server processes on 127.0.0.1 for the disaggregation tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.processes import free_port, spawn, splitserve_argv
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

ENGINE_ARGS = ["--dtype", "float32", "--num-kv-blocks", "160", "--max-model-len", "2048"]


@dataclass
class Server:
    role: str
    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> Server:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        argv = splitserve_argv(
            self.role, *ENGINE_ARGS, *self.args,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), "--engine-id", f"{self.role}-{self.port}",
        )  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = spawn(argv, output=log)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.role} exited: {self.log_path.read_text()[-3000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.role} not ready: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> pb.EngineStats:
        with grpc.insecure_channel(self.address) as channel:
            return pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=5)

    def wait_pool_full(self, timeout: float = 10.0) -> pb.EngineStats:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.num_blocks_free == s.num_blocks_total and s.num_active_leases == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role} pool not full again: {s}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, Server]]:
    """prefill (offers nixl + grpc), decode pulling with nixl, decode pulling with grpc."""
    logs = tmp_path_factory.mktemp("logs")
    made = {
        "prefill": Server(
            "prefill", ["--kv-transport", "nixl", "--lease-seconds", "5"], logs / "p.log"
        ),
        "decode_nixl": Server("decode", ["--kv-transport", "nixl"], logs / "dn.log"),
        "decode_grpc": Server("decode", ["--kv-transport", "grpc", "--colocated"], logs / "dg.log"),
    }
    try:
        for server in made.values():
            server.launch()
        for server in made.values():
            server.wait_ready(180)
        yield made
    finally:
        for server in made.values():
            server.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[dict[str, Server]]:
    """A prefill with w8a8-quantized weights and an unquantized decode (gRPC transport)."""
    logs = tmp_path_factory.mktemp("logs")
    made = {
        "prefill": Server(
            "prefill", ["--kv-transport", "grpc", "--quantization", "w8a8"], logs / "p.log"
        ),
        "decode": Server("decode", ["--kv-transport", "grpc"], logs / "d.log"),
    }
    try:
        for server in made.values():
            server.launch()
        for server in made.values():
            server.wait_ready(300)
        yield made
    finally:
        for server in made.values():
            server.stop()
