"""Watches the pods bound to this node and hands each to its worker.

List, then watch from the list's resourceVersion with bookmarks; a dropped watch reconnects
from the last version seen, and 410 Gone (the version fell out of the API server's window)
relists. A relist also catches deletions missed while disconnected. The field selector
`spec.nodeName=<node>` is the only pod list the Node authorizer grants a node.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from splitserve.cluster.nodeagent.kube import describe, is_status
from splitserve.cluster.nodeagent.launchspec import NodeServices
from splitserve.cluster.nodeagent.podworker import PodWorker

log = logging.getLogger(__name__)


class Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


class PodManager:
    """Owns the pod workers of this node (one per pod UID)."""

    def __init__(self, node: NodeServices) -> None:
        self.node = node
        self.workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.synced = threading.Event()  # set after the first list has been handled
        self._selector = f"spec.nodeName={node.config.node_name}"

    # -- the watch loop ----------------------------------------------------------------------
    def run(self) -> None:
        """List and watch until `stop()`; never raises."""
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                version = self._watch(version)
            except Gone:
                log.info("pod watch: resourceVersion expired, relisting")
                version = None
            except Exception as exc:  # noqa: BLE001 - reconnect after any failure
                if is_status(exc, 410):
                    version = None
                    continue
                if not self._stop.is_set():
                    log.warning("pod watch failed (%s); reconnecting", describe(exc))
                    self._stop.wait(1.0)

    def _relist(self) -> str:
        reply = self.node.kube.request(
            "GET", "/api/v1/pods", query={"fieldSelector": self._selector}
        )
        pods = reply.get("items") or []
        present = {p["metadata"]["uid"] for p in pods}
        for pod in pods:
            self._handle("MODIFIED", pod)
        with self._lock:
            missing = [w for uid, w in self.workers.items() if uid not in present]
        for worker in missing:
            worker.vanished()
        if not self.synced.is_set():
            # Addresses of pods that no longer exist are free again (the ones still bound keep
            # theirs, so a restarted agent gives a pod back its IP).
            released = self.node.ipam.retain_only(present)
            if released:
                log.info("released %d stale pod IPs", len(released))
            self.synced.set()
        return str(reply["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        query = {
            "fieldSelector": self._selector,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
        }
        for event in self.node.kube.watch("/api/v1/pods", query):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise RuntimeError(f"watch error: {obj.get('message')}")
            version = obj.get("metadata", {}).get("resourceVersion", version)
            if kind != "BOOKMARK":
                self._handle(str(kind), obj)
            if self._stop.is_set():
                break
        return version

    # -- dispatch ------------------------------------------------------------------------------
    def _handle(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        self._reap()
        with self._lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker is not None:
                    worker.vanished()
                return
            if worker is not None:
                worker.update(pod)
                return
            if uid in self._finished or self._stop.is_set():
                return
            worker = PodWorker(pod, self.node)
            self.workers[uid] = worker
        log.info(
            "pod %s/%s (%s) assigned", pod["metadata"]["namespace"], pod["metadata"]["name"], uid
        )
        worker.start()

    def _reap(self) -> None:
        with self._lock:
            for uid in [u for u, w in self.workers.items() if w.done.is_set()]:
                del self.workers[uid]
                self._finished.add(uid)

    # -- shutdown ------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def shutdown(self, timeout_s: float = 20.0) -> None:
        """Kill every pod's processes and tear their sandboxes down (agent exit)."""
        self._stop.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.shutdown()
        deadline = time.monotonic() + timeout_s
        for w in workers:
            w.join(max(0.1, deadline - time.monotonic()))
