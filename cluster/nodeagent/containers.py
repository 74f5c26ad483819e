"""One container slot of a pod: its process, probes, lifecycle hooks and stop sequence.

The pod worker owns the slot and is the only writer of its record; probers and stop threads only
signal (`wake`) and hold their own results, which the worker reads on its next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.cluster.nodeagent import probes
from splitserve.cluster.nodeagent.probes import Kind, ProbeSpec, Result
from splitserve.cluster.nodeagent.runtime import ContainerProcess, LaunchSpec, Runtime
from splitserve.cluster.nodeagent.status import ContainerRecord

log = logging.getLogger(__name__)

MIN_GRACE_AFTER_PRESTOP_S = 2.0  # kubelet's minimumGracePeriodInSeconds
# kubelet's limits for a termination message taken from the logs
MESSAGE_LOG_LINES = 80
MESSAGE_LOG_BYTES = 2048


@dataclass(frozen=True)
class SlotContext:
    """What a slot needs from its pod."""

    runtime: Runtime
    pod_ip: str
    wake: Callable[[], None]
    event: Callable[[str, str, str, str], None]  # (type, reason, message, fieldPath)


class ContainerSlot:
    """A container (init or app) of one pod, across its restarts."""

    def __init__(self, spec: dict[str, Any], record: ContainerRecord, ctx: SlotContext, init: bool):
        self.spec = spec
        self.record = record
        self.ctx = ctx
        self.init = init
        self.proc: ContainerProcess | None = None
        self.probers: dict[Kind, probes.Prober] = {}
        self._stopper: threading.Thread | None = None
        self.kill_reason = ""  # why the agent is stopping it (liveness, startup, deletion)
        self.ever_started = False
        self.finished_at = 0.0  # when the last instance exited (back-off counts from it)
        self.log_path: Path | None = None
        self.log_offset = 0  # where this instance's output begins in the (appended) log
        self.not_before = 0.0  # no start attempt before this (after a configuration error)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def field_path(self) -> str:
        kind = "initContainers" if self.init else "containers"
        return f"spec.{kind}{{{self.name}}}"

    # -- start -------------------------------------------------------------------------------
    def start(self, launch: LaunchSpec, container_dir: Path, log_path: Path) -> None:
        """Start a new instance (raises StartError); probes start with it."""
        self.log_path = log_path
        self.log_offset = log_path.stat().st_size if log_path.exists() else 0
        proc = self.ctx.runtime.start(launch, container_dir, log_path)
        self.proc, self.kill_reason, self.ever_started = proc, "", True
        threading.Thread(target=self._watch_exit, args=(proc,), daemon=True).start()
        self._start_probers(proc)

    def termination_message(self, exit_code: int) -> str:
        """kubelet's terminationMessagePolicy FallbackToLogsOnError: after a failed exit, the
        tail of this instance's output (80 lines, at most 2048 bytes). The message file
        (terminationMessagePath) is not mounted here, so the default policy says nothing."""
        policy = self.spec.get("terminationMessagePolicy", "File")
        if policy != "FallbackToLogsOnError" or exit_code == 0 or self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except OSError:
            return ""
        lines = data.decode(errors="replace").splitlines()[-MESSAGE_LOG_LINES:]
        text = "\n".join(lines)
        encoded = text.encode()
        if len(encoded) > MESSAGE_LOG_BYTES:
            text = encoded[-MESSAGE_LOG_BYTES:].decode(errors="ignore")
        return text

    def _watch_exit(self, proc: ContainerProcess) -> None:
        proc.shim.wait()
        self.ctx.wake()

    def _start_probers(self, proc: ContainerProcess) -> None:
        self.stop_probers()
        kinds = {
            Kind.STARTUP: "startupProbe",
            Kind.READINESS: "readinessProbe",
            Kind.LIVENESS: "livenessProbe",
        }
        if self.init:
            return  # init containers are not probed
        for kind, key in kinds.items():
            if not self.spec.get(key):
                continue
            spec = ProbeSpec.from_api(self.spec[key])
            self.probers[kind] = probes.Prober(
                kind,
                spec,
                run_once=lambda spec=spec, proc=proc: probes.run_probe(
                    spec,
                    self.spec,
                    self.ctx.pod_ip,
                    lambda argv, t: self.ctx.runtime.exec_in(proc, argv, t),
                ),
                started_at=proc.started_at,
                started=self.startup_passed,
                on_change=lambda k, r, m: self.ctx.wake(),
                on_failure=self._probe_failed,
                name=f"probe-{kind.value}-{self.name}",
            ).start()

    def _probe_failed(self, kind: Kind, message: str) -> None:
        self.ctx.event(
            "Warning",
            "Unhealthy",
            f"{kind.value.capitalize()} probe failed: {message}",
            self.field_path,
        )

    def stop_probers(self) -> None:
        for p in self.probers.values():
            p.stop()
        self.probers = {}

    # -- state ---------------------------------------------------------------------------------
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.exit_code()

    def running(self) -> bool:
        return self.proc is not None and self.proc.exit_code() is None

    def startup_passed(self) -> bool:
        p = self.probers.get(Kind.STARTUP)
        return p is None or p.result == Result.SUCCESS

    def ready(self) -> bool:
        if not self.running() or not self.startup_passed() or self.stopping:
            return False
        p = self.probers.get(Kind.READINESS)
        return p is None or p.result == Result.SUCCESS

    def failed_probe(self) -> tuple[Kind, ProbeSpec] | None:
        """A liveness or startup probe that failed (the container must be restarted)."""
        for kind in (Kind.STARTUP, Kind.LIVENESS):
            p = self.probers.get(kind)
            if p is not None and p.result == Result.FAILURE:
                return kind, p.tracker.spec
        return None

    @property
    def stopping(self) -> bool:
        return self._stopper is not None and self._stopper.is_alive()

    # -- stop ----------------------------------------------------------------------------------
    def stop_async(self, grace_s: float, reason: str, pod: dict[str, Any]) -> None:
        """Run the stop sequence on its own thread (no-op if one is running)."""
        if self.stopping or not self.running():
            return
        self.kill_reason = reason
        self._stopper = threading.Thread(
            target=self.stop, args=(grace_s, pod), name=f"stop-{self.name}", daemon=True
        )
        self._stopper.start()

    def stop(self, grace_s: float, pod: dict[str, Any]) -> None:
        """kubelet's killContainer: preStop within the grace period, SIGTERM, then SIGKILL."""
        proc = self.proc
        if proc is None or proc.exit_code() is not None:
            return
        self.stop_probers()
        deadline = time.monotonic() + grace_s
        hook = (self.spec.get("lifecycle") or {}).get("preStop")
        if hook and grace_s > 0:
            self._run_hook("PreStop", hook, proc, grace_s)
        left = max(deadline - time.monotonic(), MIN_GRACE_AFTER_PRESTOP_S if hook else 0.0)
        if grace_s > 0:
            proc.terminate()
            if proc.wait(left) is not None:
                self.ctx.wake()
                return
        proc.kill()
        proc.wait(10)
        self.ctx.wake()

    def kill_now(self) -> None:
        """SIGKILL at once (force deletion, agent shutdown)."""
        self.stop_probers()
        if self.proc is not None:
            self.proc.kill()

    def post_start(self, timeout_s: float = 30.0) -> bool:
        """Run the postStart hook, if any; False when it failed (the container is then killed)."""
        hook = (self.spec.get("lifecycle") or {}).get("postStart")
        if not hook or self.proc is None:
            return True
        return self._run_hook("PostStart", hook, self.proc, timeout_s)

    def _run_hook(
        self, name: str, hook: dict[str, Any], proc: ContainerProcess, timeout_s: float
    ) -> bool:
        if "exec" in hook:
            code, output = self.ctx.runtime.exec_in(proc, list(hook["exec"]["command"]), timeout_s)
            ok, message = code == 0, f"exit code {code}: {output.strip()[-512:]}"
        elif "httpGet" in hook:
            h = hook["httpGet"]
            port = probes.resolve_port(h["port"], self.spec)
            result, message = probes.http_probe(self.ctx.pod_ip, port, h, timeout_s)
            ok = result == Result.SUCCESS
        elif "sleep" in hook:
            time.sleep(min(float(hook["sleep"]["seconds"]), timeout_s))
            ok, message = True, ""
        else:
            ok, message = False, f"unsupported hook {sorted(hook)}"
        if not ok:
            self.ctx.event(
                "Warning", f"Failed{name}Hook", f"{name} hook failed: {message}", self.field_path
            )
        return ok
