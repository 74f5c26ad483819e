"""Pod status as kubelet reports it: container statuses, phase and conditions (pure functions)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def rfc3339(ts: float) -> str:
    """An API timestamp (seconds precision, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def exit_reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"


@dataclass
class ContainerRecord:
    """What the agent knows about one container; `to_api` gives its ContainerStatus."""

    name: str
    image: str
    image_id: str = ""
    restart_count: int = 0
    # Exactly one of: waiting (reason, message), running (started_at), terminated (...).
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    running_since: float | None = None
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    ready: bool = False
    started: bool = False
    container_id: str = ""

    def set_waiting(self, reason: str, message: str = "") -> None:
        self.waiting, self.running_since, self.ready, self.started = (
            (reason, message),
            None,
            False,
            False,
        )

    def set_running(self, started_at: float, container_id: str) -> None:
        if self.terminated is not None:
            self.last_terminated = self.terminated
        self.waiting, self.terminated = None, None
        self.running_since, self.container_id = started_at, container_id

    def set_terminated(
        self,
        code: int,
        started_at: float | None,
        finished_at: float,
        reason: str = "",
        message: str = "",
    ) -> None:
        self.terminated = {
            "exitCode": code,
            "reason": reason or exit_reason(code),
            "startedAt": rfc3339(started_at) if started_at else None,
            "finishedAt": rfc3339(finished_at),
            "containerID": self.container_id or None,
        }
        if message:
            self.terminated["message"] = message
        self.waiting, self.running_since, self.ready, self.started = None, None, False, False

    def set_restarting(self, reason: str, message: str = "") -> None:
        """Waiting for a restart: the exit just recorded moves to lastState."""
        if self.terminated is not None:
            self.last_terminated = self.terminated
            self.terminated = None
        self.set_waiting(reason, message)

    def to_api(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.running_since is not None:
            state = {"running": {"startedAt": rfc3339(self.running_since)}}
        elif self.terminated is not None:
            state = {"terminated": {k: v for k, v in self.terminated.items() if v is not None}}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason} | ({"message": message} if message else {})}
        last = self.last_terminated
        out: dict[str, Any] = {
            "name": self.name,
            "state": state,
            "lastState": {"terminated": {k: v for k, v in last.items() if v is not None}}
            if last
            else {},
            "ready": self.ready,
            "restartCount": self.restart_count,
            "image": self.image,
            "imageID": self.image_id,
            "started": self.started,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def pod_phase(
    spec: dict[str, Any],
    init_statuses: list[dict[str, Any]],
    statuses: list[dict[str, Any]],
    terminal: bool = False,
) -> str:
    """kubelet's getPhase (native sidecar init containers are not supported)."""
    policy = spec.get("restartPolicy", "Always")
    by_name = {s["name"]: s for s in init_statuses + statuses}
    pending_init = failed_init = 0
    for c in spec.get("initContainers") or []:
        st = by_name.get(c["name"])
        state = (st or {}).get("state") or {}
        last = ((st or {}).get("lastState") or {}).get("terminated")
        if "terminated" in state:
            failed_init += state["terminated"]["exitCode"] != 0
        elif "waiting" in state and last:
            failed_init += last["exitCode"] != 0
        else:
            pending_init += 1
    running = waiting = stopped = succeeded = unknown = 0
    for c in spec["containers"]:
        st = by_name.get(c["name"])
        if st is None:
            unknown += 1
            continue
        state = st.get("state") or {}
        last = (st.get("lastState") or {}).get("terminated")
        if "running" in state:
            running += 1
        elif "terminated" in state:
            stopped += 1
            succeeded += state["terminated"]["exitCode"] == 0
        elif "waiting" in state:
            if last:
                stopped += 1
            else:
                waiting += 1
        else:
            unknown += 1
    if failed_init and policy == "Never":
        return "Failed"
    if pending_init or waiting:
        return "Pending"
    if running and not unknown:
        return "Running"
    if not running and stopped and not unknown:
        if terminal:
            return "Succeeded" if stopped == succeeded else "Failed"
        if policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        return "Failed" if policy == "Never" else "Running"
    return "Pending"


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    c: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
    if not ok and reason:
        c["reason"] = reason
    if not ok and message:
        c["message"] = message
    return c


@dataclass
class PodView:
    """The agent's facts about a pod at one moment, from which its status is built."""

    pod: dict[str, Any]
    init: list[ContainerRecord]
    containers: list[ContainerRecord]
    pod_ip: str | None
    host_ip: str
    start_time: float
    sandbox_ready: bool
    initialized: bool
    terminal: bool = False
    message: str = ""
    reason: str = ""
    extra_conditions: list[dict[str, Any]] = field(default_factory=list)


def pod_conditions(view: PodView, phase: str) -> list[dict[str, Any]]:
    """PodReadyToStartContainers, Initialized, ContainersReady, Ready (no readiness gates)."""
    pending_init = [
        r.name for r in view.init if not (r.terminated and r.terminated["exitCode"] == 0)
    ]
    unready = [r.name for r in view.containers if not r.ready]
    done = phase in ("Succeeded", "Failed")
    if done:
        ready_reason, ready_msg = "PodCompleted", ""
    else:
        ready_reason = "ContainersNotReady"
        ready_msg = f"containers with unready status: [{' '.join(unready)}]"
    all_ready = not unready and not done
    return [
        _condition("PodReadyToStartContainers", view.sandbox_ready and not done),
        _condition(
            "Initialized",
            view.initialized or not pending_init,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(pending_init)}]",
        ),
        _condition("ContainersReady", all_ready, ready_reason, ready_msg),
        _condition("Ready", all_ready, ready_reason, ready_msg),
    ]


def merge_conditions(
    previous: list[dict[str, Any]], fresh: list[dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Fresh conditions with lastTransitionTime kept while the status is unchanged; other
    conditions (PodScheduled, DisruptionTarget, ...) are carried over as they were."""
    before = {c["type"]: c for c in previous}
    out = []
    for c in fresh:
        old = before.get(c["type"])
        keep = old is not None and old.get("status") == c["status"]
        since = old.get("lastTransitionTime") if keep and old else None
        out.append(c | {"lastTransitionTime": since or rfc3339(now)})
    ours = {c["type"] for c in fresh}
    return [c for c in previous if c["type"] not in ours] + out


def pod_status(view: PodView, now: float) -> dict[str, Any]:
    """The full status the agent writes (merge patch: lists replace, other fields are left)."""
    init = [r.to_api() for r in view.init]
    containers = [r.to_api() for r in view.containers]
    phase = pod_phase(view.pod["spec"], init, containers, view.terminal)
    previous = (view.pod.get("status") or {}).get("conditions") or []
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": merge_conditions(previous, pod_conditions(view, phase), now),
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": rfc3339(view.start_time),
        "containerStatuses": containers,
        "initContainerStatuses": init,
        "message": view.message or None,
        "reason": view.reason or None,
    }
    if view.pod_ip:
        status["podIP"] = view.pod_ip
        status["podIPs"] = [{"ip": view.pod_ip}]
    return status
