"""Startup, readiness and liveness probes with kubelet's semantics.

One `Prober` thread per probe of a running container. It ticks every periodSeconds from the
container's start (the first tick at once), skips ticks before initialDelaySeconds, and - for
readiness and liveness - until the container has started (startup probe passed). A result changes
only after successThreshold / failureThreshold equal results in a row (`ProbeTracker`). Initial
results: readiness Failure, liveness Success, startup Unknown. After a liveness or startup failure
the prober holds (the container is being restarted; a new container gets new probers).
HTTP, TCP and gRPC probes run from the host against the pod IP, as kubelet's do; exec probes run
inside the container through the runtime.
"""

from __future__ import annotations

import enum
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

USER_AGENT = "kube-probe/splitserve-nodeagent"


class Result(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"


class Kind(enum.Enum):
    STARTUP = "startup"
    READINESS = "readiness"
    LIVENESS = "liveness"

    @property
    def initial(self) -> Result:
        return {
            Kind.STARTUP: Result.UNKNOWN,
            Kind.READINESS: Result.FAILURE,
            Kind.LIVENESS: Result.SUCCESS,
        }[self]


@dataclass(frozen=True)
class ProbeSpec:
    """A probe from the pod spec, with the API's defaults filled in."""

    handler: dict[str, Any]  # {"httpGet": ...} | {"tcpSocket": ...} | {"grpc": ...} | {"exec": ...}
    initial_delay_s: int = 0
    period_s: int = 10
    timeout_s: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3
    termination_grace_s: int | None = None

    @classmethod
    def from_api(cls, probe: dict[str, Any]) -> ProbeSpec:
        handler = {k: v for k, v in probe.items() if k in ("httpGet", "tcpSocket", "grpc", "exec")}
        if len(handler) != 1:
            raise ValueError(f"a probe needs exactly one handler, got {sorted(handler)}")
        return cls(
            handler=handler,
            initial_delay_s=int(probe.get("initialDelaySeconds", 0)),
            period_s=max(1, int(probe.get("periodSeconds", 10))),
            timeout_s=max(1, int(probe.get("timeoutSeconds", 1))),
            success_threshold=max(1, int(probe.get("successThreshold", 1))),
            failure_threshold=max(1, int(probe.get("failureThreshold", 3))),
            termination_grace_s=probe.get("terminationGracePeriodSeconds"),
        )


class ProbeTracker:
    """The threshold rule: a result takes effect after N equal raw results in a row."""

    def __init__(self, kind: Kind, spec: ProbeSpec) -> None:
        self.kind = kind
        self.spec = spec
        self.result = kind.initial
        self._last: Result | None = None
        self._run = 0

    def observe(self, raw: Result) -> bool:
        """Record one raw result; True when the effective result changed."""
        if raw == self._last:
            self._run += 1
        else:
            self._last, self._run = raw, 1
        needed = (
            self.spec.failure_threshold if raw == Result.FAILURE else self.spec.success_threshold
        )
        if self._run < needed or raw == self.result:
            return False
        self.result = raw
        return True


def resolve_port(port: int | str, container: dict[str, Any]) -> int:
    """A probe port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container {container['name']!r} has no port named {port!r}")


def http_probe(host: str, port: int, spec: dict[str, Any], timeout_s: float) -> tuple[Result, str]:
    """httpGet: success for any status in [200, 400), like kubelet (redirects not followed)."""
    scheme = spec.get("scheme", "HTTP").upper()
    target = spec.get("host") or host
    path = spec.get("path") or "/"
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    headers |= {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
    if scheme == "HTTPS":
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # kubelet skips verification
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            target, port, timeout=timeout_s, context=ctx
        )
    else:
        conn = http.client.HTTPConnection(target, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read(10240)
        if 200 <= resp.status < 400:
            return Result.SUCCESS, ""
        return Result.FAILURE, f"HTTP probe failed with statuscode: {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return Result.FAILURE, f'Get "{scheme.lower()}://{target}:{port}{path}": {exc}'
    finally:
        conn.close()


def tcp_probe(host: str, port: int, timeout_s: float) -> tuple[Result, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return Result.SUCCESS, ""
    except OSError as exc:
        return Result.FAILURE, f"dial tcp {host}:{port}: {exc}"


def grpc_probe(host: str, port: int, service: str, timeout_s: float) -> tuple[Result, str]:
    """grpc.health.v1 Check: success only for SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        return Result.FAILURE, f"failed to connect service {target!r} within {timeout_s}s: {code}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return Result.SUCCESS, ""
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Result.FAILURE, f"service unhealthy (responded with {status!r})"


ExecFn = Callable[[list[str], float], tuple[int | None, str]]


def run_probe(
    spec: ProbeSpec, container: dict[str, Any], pod_ip: str, exec_fn: ExecFn
) -> tuple[Result, str]:
    """One raw probe result (any unexpected error counts as a failure)."""
    handler = spec.handler
    try:
        if "httpGet" in handler:
            h = handler["httpGet"]
            return http_probe(pod_ip, resolve_port(h["port"], container), h, spec.timeout_s)
        if "tcpSocket" in handler:
            h = handler["tcpSocket"]
            port = resolve_port(h["port"], container)
            return tcp_probe(h.get("host") or pod_ip, port, spec.timeout_s)
        if "grpc" in handler:
            h = handler["grpc"]
            return grpc_probe(pod_ip, int(h["port"]), h.get("service") or "", spec.timeout_s)
        code, output = exec_fn(list(handler["exec"]["command"]), spec.timeout_s)
        if code is None:
            return Result.FAILURE, f"command timed out after {spec.timeout_s}s"
        return (Result.SUCCESS, "") if code == 0 else (Result.FAILURE, output.strip()[-1024:])
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run fails
        return Result.FAILURE, f"probe error: {exc}"


class Prober:
    """Runs one probe of one container on its own thread until stopped.

    `on_change(kind, result, message)` is called (from the prober's thread) whenever the
    effective result changes; `on_failure(kind, message)` for every raw failure (for events).
    `started` tells whether the container's startup probe has passed (gates the others).
    """

    def __init__(
        self,
        kind: Kind,
        spec: ProbeSpec,
        run_once: Callable[[], tuple[Result, str]],
        started_at: float,
        started: Callable[[], bool],
        on_change: Callable[[Kind, Result, str], None],
        on_failure: Callable[[Kind, str], None] | None = None,
        name: str = "probe",
    ) -> None:
        self.kind = kind
        self.tracker = ProbeTracker(kind, spec)
        self._run_once = run_once
        self._started_at = started_at
        self._started = started
        self._on_change = on_change
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def result(self) -> Result:
        return self.tracker.result

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> bool:
        """One period; False when the prober should hold (stop probing)."""
        spec = self.tracker.spec
        if time.time() - self._started_at < spec.initial_delay_s:
            return True
        if self.kind != Kind.STARTUP and not self._started():
            return True
        if self.kind == Kind.STARTUP and self.tracker.result == Result.SUCCESS:
            return False  # startup probes stop once they pass
        raw, message = self._run_once()
        if self._stop.is_set():
            return False
        if raw == Result.FAILURE and self._on_failure:
            self._on_failure(self.kind, message)
        if self.tracker.observe(raw):
            self._on_change(self.kind, self.tracker.result, message)
            if self.kind != Kind.READINESS and self.tracker.result == Result.FAILURE:
                return False  # the container will be restarted: hold
        return True

    def _loop(self) -> None:
        period = self.tracker.spec.period_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                if not self._tick():
                    return
            except Exception:  # noqa: BLE001 - a broken tick must not kill the pod
                log.exception("%s probe tick failed", self.kind.value)
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
