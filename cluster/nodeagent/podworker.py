"""One pod's life on the node, on its own thread: sandbox, init containers, containers, end.

The steps mirror kubelet's SyncPod: make the sandbox (IP, network namespace, volumes), run init
containers one by one to completion, start the containers, then keep them as the restart policy
wants (crash-loop back-off, liveness/startup restarts), publishing status on every change. A
deletionTimestamp starts the graceful stop (preStop, SIGTERM, SIGKILL at the grace period's end);
the object then goes with grace 0, as kubelet deletes it. A pod object that vanished (force
deletion) or an agent shutdown kills at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from splitserve.cluster.nodeagent import envvars, launchspec, network
from splitserve.cluster.nodeagent.backoff import Backoff
from splitserve.cluster.nodeagent.containers import ContainerSlot, SlotContext
from splitserve.cluster.nodeagent.kube import describe, is_status, is_transient
from splitserve.cluster.nodeagent.launchspec import NodeServices
from splitserve.cluster.nodeagent.objects import NotReady
from splitserve.cluster.nodeagent.runtime import LaunchSpec, StartError
from splitserve.cluster.nodeagent.status import ContainerRecord, PodView, pod_status
from splitserve.cluster.nodeagent.statuswriter import PodRef
from splitserve.cluster.nodeagent.volumes import (
    ImagePullError,
    PodContext,
    PodVolumes,
    VolumeError,
)

log = logging.getLogger(__name__)

REFRESH_VOLUMES_S = 60.0  # kubelet re-reads configMaps/secrets about once a minute
SANDBOX_RETRY_S = 2.0


def pod_dir_name(pod: dict[str, Any]) -> str:
    m = pod["metadata"]
    return f"{m['namespace']}_{m['name']}_{m['uid']}"


class PodWorker:
    """Runs one pod; `update`, `vanished` and `shutdown` are called from other threads."""

    def __init__(self, pod: dict[str, Any], node: NodeServices) -> None:
        self.node = node
        self.ref = PodRef.of(pod)
        self.uid = self.ref.uid
        self.dir = node.config.pods_dir / pod_dir_name(pod)
        self._pod = pod
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._vanished = False
        self._shutdown = False
        self.done = threading.Event()
        spec = pod["spec"]
        self.host_network = bool(spec.get("hostNetwork"))
        self.pod_ip: str | None = None
        self.sandbox_ready = False
        self.initialized = False
        self.terminal = False
        self.start_time = time.time()
        self.volumes: PodVolumes | None = None
        self.backoff = Backoff(node.config.backoff_initial_s, node.config.backoff_max_s)
        self._conditions = list((pod.get("status") or {}).get("conditions") or [])
        self._last_refresh = 0.0
        self._recent_events: dict[tuple[str, str], float] = {}
        ctx = SlotContext(node.runtime, "", self._wake.set, self._event)
        self.init = [self._slot(c, ctx, True) for c in spec.get("initContainers") or []]
        self.containers = [self._slot(c, ctx, False) for c in spec["containers"]]
        self._adopt_previous_status(pod)
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.ref.name}", daemon=True)

    # -- called from other threads ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def vanished(self) -> None:
        """The pod object is gone (force deletion): kill everything now."""
        self._vanished = True
        for slot in self.init + self.containers:
            slot.kill_now()
        self._wake.set()

    def shutdown(self) -> None:
        """The agent is stopping: kill everything now, leave the API object alone."""
        self._shutdown = True
        for slot in self.init + self.containers:
            slot.kill_now()
        self._wake.set()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    @property
    def pod(self) -> dict[str, Any]:
        with self._lock:
            return self._pod

    # -- setup -------------------------------------------------------------------------------
    def _slot(self, spec: dict[str, Any], ctx: SlotContext, init: bool) -> ContainerSlot:
        image_id = f"splitserve-image@sha256:{self.node.current_image().id}"
        record = ContainerRecord(spec["name"], spec.get("image", ""), image_id)
        if init:
            record.waiting = ("PodInitializing", "")
        return ContainerSlot(spec, record, ctx, init)

    def _adopt_previous_status(self, pod: dict[str, Any]) -> None:
        """A pod the agent ran before it restarted: keep restart counts; running ones died."""
        status = pod.get("status") or {}
        self.terminal = status.get("phase") in ("Succeeded", "Failed")
        if status.get("startTime"):
            from datetime import datetime

            self.start_time = datetime.fromisoformat(
                status["startTime"].replace("Z", "+00:00")
            ).timestamp()
        previous = {s["name"]: s for s in (status.get("containerStatuses") or [])}
        previous |= {s["name"]: s for s in (status.get("initContainerStatuses") or [])}
        for slot in self.init + self.containers:
            old = previous.get(slot.name)
            if not old:
                continue
            slot.record.restart_count = int(old.get("restartCount", 0))
            if "running" in (old.get("state") or {}) and not self.terminal:
                slot.record.last_terminated = {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the node agent restarted",
                    "finishedAt": None,
                    "startedAt": None,
                }
                slot.record.restart_count += 1
            if self.terminal:
                slot.record.terminated = (old.get("state") or {}).get("terminated")
                slot.record.waiting = None if slot.record.terminated else slot.record.waiting

    def _sandbox(self) -> None:
        """IP, network namespace and volumes; raises NotReady/VolumeError/NetworkError."""
        cfg = self.node.config
        if self.pod_ip is None:
            if self.host_network:
                self.pod_ip = cfg.node_ip
            else:
                ip = self.node.ipam.allocate(self.uid)
                network.setup(self.uid, ip, cfg.pod_cidr, cfg.gateway, cfg.bridge)
                self.pod_ip = str(ip)
            for slot in self.init + self.containers:
                slot.ctx = SlotContext(self.node.runtime, self.pod_ip, self._wake.set, self._event)
        self.sandbox_ready = True
        if self.volumes is None:
            ctx = PodContext(cfg.node_ip, self.pod_ip, self.node.allocatable())
            self.volumes = PodVolumes(
                self.pod, self.dir, self.node.objects, self.node.tokens, ctx, self.node.images
            )
        self.volumes.setup()
        self._last_refresh = time.monotonic()

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._lifecycle()
        except Exception:
            log.exception("pod %s/%s: worker failed", self.ref.namespace, self.ref.name)
            for slot in self.init + self.containers:
                slot.kill_now()
        finally:
            self._teardown(release_ip=not self._shutdown)
            self.node.writer.forget(self.ref)
            self.done.set()

    def _lifecycle(self) -> None:
        if not self.terminal:
            self._make_sandbox()
            while not self._should_end():
                try:
                    self._step()
                except Exception as exc:
                    # An API server too busy to answer (a read timeout under load) must not end
                    # the worker: the pod would never start or be deleted. Retry the step.
                    if not is_transient(exc):
                        raise
                    log.warning("pod %s: API call failed, retrying: %s", self.ref.name, exc)
                    self._wake.wait(SANDBOX_RETRY_S)
                    continue
                self._publish()
                self._wake.wait(self._sleep_for())
                self._wake.clear()
        self._finish()

    def _make_sandbox(self) -> None:
        while not self._should_end():
            reason = ""
            try:
                self._sandbox()
                return
            except ImagePullError as exc:
                self._event("Warning", "Failed", f"Failed to pull image: {exc}", "")
                message, reason = str(exc), "ErrImagePull"
            except NotReady as exc:
                self._event("Warning", "FailedMount", str(exc), "")
                message = str(exc)
            except (VolumeError, network.NetworkError, OSError, ValueError) as exc:
                self._event("Warning", "FailedCreatePodSandBox", str(exc), "")
                message = str(exc)
            for slot in self.init + self.containers:
                if slot.record.waiting:
                    slot.record.waiting = (reason or slot.record.waiting[0], message)
            self._publish()
            self._wake.wait(SANDBOX_RETRY_S)
            self._wake.clear()

    def _should_end(self) -> bool:
        if self._vanished or self._shutdown or self.terminal:
            return True
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def _sleep_for(self) -> float:
        """Until the next thing due: a back-off's end, a retry, or a 1 s housekeeping tick."""
        now, delay = time.time(), 1.0
        for slot in self.init + self.containers:
            if slot.record.waiting and slot.record.waiting[0] == "CrashLoopBackOff":
                due = self.backoff.restart_at(self._key(slot), slot.finished_at)
                delay = min(delay, due - now)
        return max(0.05, delay)

    def _step(self) -> None:
        now = time.time()
        if now - self._last_refresh > REFRESH_VOLUMES_S and self.volumes is not None:
            self._last_refresh = now
            try:
                self.volumes.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the old content
                log.warning("pod %s: volume refresh failed: %s", self.ref.name, describe(exc))
        if not self.initialized:
            self._step_init()
            if not self.initialized:
                return
        for slot in self.containers:
            self._step_container(slot)
        for slot in self.containers:
            slot.record.started = slot.running() and slot.startup_passed()
            slot.record.ready = slot.ready()
        self._check_terminal()

    def _step_init(self) -> None:
        """Run init containers one at a time, in order, each to a successful exit."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for slot in self.init:
            if slot.running():
                return
            if slot.proc is not None:  # just exited
                self._record_exit(slot)
            t = slot.record.terminated
            if t is not None and t["exitCode"] == 0:
                continue
            if t is not None and policy == "Never":
                self.terminal = True  # a failed init container fails the pod (no restart)
                return
            self._maybe_start(slot, restart=slot.ever_started)
            return
        self.initialized = True
        for slot in self.containers:
            if slot.record.waiting and slot.record.waiting[0] == "PodInitializing":
                slot.record.waiting = ("ContainerCreating", "")

    def _step_container(self, slot: ContainerSlot) -> None:
        if slot.running():
            failed = slot.failed_probe()
            if failed is not None and not slot.stopping:
                kind, spec = failed
                grace = spec.termination_grace_s
                if grace is None:
                    grace = self._grace_period()
                self._event(
                    "Normal",
                    "Killing",
                    f"Container {slot.name} failed {kind.value} probe, will be restarted",
                    slot.field_path,
                )
                slot.stop_async(float(grace), kind.value, self.pod)
            return
        if slot.proc is not None:
            self._record_exit(slot)
        if slot.ever_started and not self._should_restart(slot):
            return
        self._maybe_start(slot, restart=slot.ever_started)

    def _should_restart(self, slot: ContainerSlot) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        t = slot.record.terminated or slot.record.last_terminated or {}
        if policy == "Always":
            return True
        if policy == "OnFailure":
            return t.get("exitCode", 1) != 0
        return False

    def _record_exit(self, slot: ContainerSlot) -> None:
        proc = slot.proc
        assert proc is not None
        code = proc.exit_code()
        slot.finished_at = time.time()
        slot.stop_probers()
        code = 137 if code is None else code
        message = slot.termination_message(code)
        slot.record.set_terminated(code, proc.started_at, slot.finished_at, message=message)
        slot.proc = None
        log.info("pod %s: container %s exited with %s", self.ref.name, slot.name, code)

    def _key(self, slot: ContainerSlot) -> str:
        return f"{self.uid}/{slot.name}"

    def _maybe_start(self, slot: ContainerSlot, restart: bool) -> None:
        """Start (or restart, after its back-off) a container."""
        now = time.time()
        key = self._key(slot)
        if now < slot.not_before:
            return
        if restart and self.backoff.in_backoff(key, slot.finished_at, now):
            if not (slot.record.waiting and slot.record.waiting[0] == "CrashLoopBackOff"):
                self._event(
                    "Warning",
                    "BackOff",
                    f"Back-off restarting failed container {slot.name}",
                    slot.field_path,
                )
            delay = self.backoff.delay(key)
            slot.record.set_restarting(
                "CrashLoopBackOff",
                f"back-off {delay:.0f}s restarting failed container={slot.name} "
                f"pod={self.ref.name}_{self.ref.namespace}({self.uid})",
            )
            return
        try:
            launch = self._launch_spec(slot)
        except (envvars.ConfigError, NotReady, VolumeError, ValueError) as exc:
            # kubelet: CreateContainerConfigError, retried without the crash-loop back-off.
            slot.record.set_restarting("CreateContainerConfigError", str(exc))
            slot.not_before = now + SANDBOX_RETRY_S
            self._event("Warning", "Failed", f"Error: {exc}", slot.field_path)
            return
        if restart:
            self.backoff.next(key, slot.finished_at, now)
            slot.record.restart_count += 1
        cdir = self.dir / "containers" / slot.name
        try:
            slot.start(launch, cdir, self.dir / f"{slot.name}.log")
        except StartError as exc:
            slot.ever_started = True
            slot.finished_at = time.time()
            slot.record.set_terminated(128, now, slot.finished_at, "StartError", str(exc))
            self._event("Warning", "Failed", f"Error: {exc}", slot.field_path)
            return
        assert slot.proc is not None
        container_id = f"splitserve://{self.uid[:8]}-{slot.name}-{slot.record.restart_count}"
        slot.record.set_running(slot.proc.started_at, container_id)
        self._event("Normal", "Started", f"Started container {slot.name}", slot.field_path)
        if not slot.post_start():
            slot.stop_async(float(self._grace_period()), "postStart", self.pod)

    def _check_terminal(self) -> None:
        """All containers done and none to restart: the pod has finished (Succeeded/Failed)."""
        for slot in self.containers:
            if slot.running() or not slot.ever_started or self._should_restart(slot):
                return
        self.terminal = True

    # -- the container's configuration ------------------------------------------------------
    def _launch_spec(self, slot: ContainerSlot) -> LaunchSpec:
        assert self.volumes is not None and self.pod_ip is not None
        sandbox = launchspec.Sandbox(
            pod=self.pod,
            pod_ip=self.pod_ip,
            netns=None if self.host_network else str(network.netns_path(self.uid)),
            hostname=self.node.host_hostname if self.host_network else None,
            volumes=self.volumes,
            scratch=self.dir / "containers" / slot.name / "rootfs",
        )
        return launchspec.build(self.node, sandbox, slot.spec)

    def _grace_period(self) -> int:
        return int(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    # -- the end -----------------------------------------------------------------------------
    def _finish(self) -> None:
        """Stop every container as the situation asks, write the last status, delete the pod."""
        if self._shutdown:
            return
        meta = self.pod["metadata"]
        if not self._vanished and meta.get("deletionTimestamp"):
            grace = meta.get("deletionGracePeriodSeconds")
            grace = self._grace_period() if grace is None else int(grace)
            self._stop_all(float(grace), "deletion")
        else:
            for slot in self.init + self.containers:
                if slot.running():
                    slot.kill_now()
        for slot in self.init + self.containers:
            if slot.proc is not None:
                slot.proc.wait(15)
                self._record_exit(slot)
        if self._vanished:
            return
        self.terminal = True
        self._publish()
        if meta.get("deletionTimestamp"):
            self.node.writer.flush(5.0)
            self._delete_object()
        else:  # finished by itself (Succeeded/Failed): keep the object, free the sandbox
            self._teardown(release_ip=True)
            self._wait_for_deletion()

    def _stop_all(self, grace_s: float, reason: str) -> None:
        slots = [s for s in self.init + self.containers if s.running()]
        threads = [
            threading.Thread(target=s.stop, args=(grace_s, self.pod), daemon=True) for s in slots
        ]
        for s in slots:
            s.kill_reason = reason
        for t in threads:
            t.start()
        deadline = time.monotonic() + grace_s + 15
        for t in threads:
            while t.is_alive() and time.monotonic() < deadline:
                t.join(0.2)
                if self._vanished or self._shutdown:  # escalated: force deletion while stopping
                    for s in slots:
                        s.kill_now()

    def _wait_for_deletion(self) -> None:
        while not (self._vanished or self._shutdown):
            if self.pod["metadata"].get("deletionTimestamp"):
                self._delete_object()
                return
            self._wake.wait(5.0)
            self._wake.clear()

    def _delete_object(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            self.node.kube.request("DELETE", self.ref.path, body=body)
        except Exception as exc:
            if not is_status(exc, 404, 409):
                log.warning("pod %s: delete failed: %s", self.ref.name, describe(exc))

    def _teardown(self, release_ip: bool) -> None:
        for slot in self.init + self.containers:
            slot.kill_now()
        if self.volumes is not None:
            self.volumes.teardown()
            self.volumes = None
        if not self.host_network and self.sandbox_ready:
            network.teardown(self.uid)
        self.sandbox_ready = False
        if release_ip and not self.host_network:
            self.node.ipam.release(self.uid)

    # -- reporting -----------------------------------------------------------------------------
    def _publish(self) -> None:
        if self._vanished or self._shutdown:
            return
        view = PodView(
            pod=self.pod
            | {"status": (self.pod.get("status") or {}) | {"conditions": self._conditions}},
            init=[s.record for s in self.init],
            containers=[s.record for s in self.containers],
            pod_ip=self.pod_ip,
            host_ip=self.node.config.node_ip,
            start_time=self.start_time,
            sandbox_ready=self.sandbox_ready,
            initialized=self.initialized,
            terminal=self.terminal,
        )
        status = pod_status(view, time.time())
        self._conditions = status["conditions"]
        self.node.writer.submit(self.ref, status)

    def _event(self, kind: str, reason: str, message: str, field: str) -> None:
        key, now = (reason, message), time.monotonic()
        if now - self._recent_events.get(key, -1e9) < 30.0:
            return
        self._recent_events[key] = now
        log.info("pod %s/%s: %s %s", self.ref.namespace, self.ref.name, reason, message)
        self.node.writer.event(self.ref, kind, reason, message, field)
