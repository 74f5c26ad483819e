"""Writes pod statuses and events to the API server from one thread, latest status wins.

Pod workers hand over a full status whenever theirs changes and never wait for the API server;
the writer patches the pod's status subresource (JSON merge patch: the lists it sends replace
the old ones, which is what a full status wants), skips a status equal to the last one written,
and retries failures on its next round. Events are best effort.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from splitserve.cluster.nodeagent.kube import MERGE_PATCH, Kube, describe, is_status
from splitserve.cluster.nodeagent.status import rfc3339

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, pod: dict[str, Any]) -> PodRef:
        m = pod["metadata"]
        return cls(m["namespace"], m["name"], m["uid"])

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


class StatusWriter:
    """Background writer of pod statuses and events."""

    def __init__(self, kube: Kube, node_name: str) -> None:
        self.kube = kube
        self.node_name = node_name
        self._lock = threading.Condition()
        self._pending: dict[PodRef, dict[str, Any]] = {}
        self._written: dict[PodRef, str] = {}
        self._events: list[dict[str, Any]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="status-writer", daemon=True)
        self._thread.start()

    def submit(self, ref: PodRef, status: dict[str, Any]) -> None:
        """Queue a pod's full status (replaces any not yet written)."""
        with self._lock:
            if self._written.get(ref) == json.dumps(status, sort_keys=True):
                self._pending.pop(ref, None)
                return
            self._pending[ref] = status
            self._lock.notify()

    def event(self, ref: PodRef, kind: str, reason: str, message: str, field: str = "") -> None:
        """Record a core/v1 Event about a pod (Normal or Warning)."""
        now = rfc3339(time.time())
        involved = {
            "kind": "Pod",
            "apiVersion": "v1",
            "namespace": ref.namespace,
            "name": ref.name,
            "uid": ref.uid,
        }
        if field:
            involved["fieldPath"] = field
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:16]}", "namespace": ref.namespace},
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubelet", "host": self.node_name},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
        }
        with self._lock:
            if len(self._events) < 1000:
                self._events.append(body)
                self._lock.notify()

    def forget(self, ref: PodRef) -> None:
        with self._lock:
            self._pending.pop(ref, None)
            self._written.pop(ref, None)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until everything queued has been tried once."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while (self._pending or self._events) and time.monotonic() < deadline:
                self._lock.wait(0.1)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._events and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                pending, self._pending = self._pending, {}
                events, self._events = self._events, []
            failed = {ref: st for ref, st in pending.items() if not self._write(ref, st)}
            for body in events:
                self._post_event(body)
            with self._lock:
                for ref, st in failed.items():
                    self._pending.setdefault(ref, st)
                self._lock.notify_all()
            if failed:
                time.sleep(1.0)

    def _write(self, ref: PodRef, status: dict[str, Any]) -> bool:
        body = {"metadata": {"uid": ref.uid}, "status": status}
        try:
            self.kube.request("PATCH", ref.path + "/status", body=body, content_type=MERGE_PATCH)
        except Exception as exc:
            if is_status(exc, 404, 409):
                return True  # gone, or replaced by a new pod of that name: nothing to write
            if is_status(exc, 422):
                log.error("status of %s/%s refused: %s", ref.namespace, ref.name, describe(exc))
                return True  # invalid: retrying the same status cannot help
            log.warning("status of %s/%s not written: %s", ref.namespace, ref.name, describe(exc))
            return False
        with self._lock:
            self._written[ref] = json.dumps(status, sort_keys=True)
        return True

    def _post_event(self, body: dict[str, Any]) -> None:
        ns = body["metadata"]["namespace"]
        try:
            self.kube.request("POST", f"/api/v1/namespaces/{ns}/events", body=body, timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - events are best effort
            log.debug("event not recorded: %s", exc)
