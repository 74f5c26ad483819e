"""The Node object and its Lease: registration, status heartbeats, lease renewal.

As kubelet: the node creates its own Node (NodeRestriction lets it, with only the labels a node may
set itself), reports capacity/allocatable, addresses, nodeInfo and conditions through the status
subresource every heartbeat, and renews `kube-node-lease/<node>` so the node lifecycle controller
keeps it Ready. CPU is advertised generously (requests are not enforced here: every pod shares the
host's cores), memory as the host's, at least 64Gi.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from splitserve.cluster.nodeagent.config import AgentConfig
from splitserve.cluster.nodeagent.kube import MERGE_PATCH, Kube, describe, is_status
from splitserve.cluster.nodeagent.status import rfc3339

log = logging.getLogger(__name__)

RUNTIME_VERSION = "splitserve-nodeagent://0.1.0"
MIN_MEMORY = 64 * 2**30


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip('"')
    return "Linux"


def capacity(config: AgentConfig) -> dict[str, str]:
    """cpu, memory, pods, ephemeral-storage (no nvidia.com/gpu: these nodes have none)."""
    if config.memory_capacity:
        memory = config.memory_capacity
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = f"{max(total, MIN_MEMORY) // 2**10}Ki"
    disk = shutil.disk_usage(config.state_dir).total
    return {
        "cpu": config.cpu_capacity,
        "memory": memory,
        "pods": str(config.max_pods),
        "ephemeral-storage": f"{disk // 2**10}Ki",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    }


def labels(node_name: str) -> dict[str, str]:
    """Labels a node may set on itself (NodeRestriction refuses node-role.kubernetes.io/*)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return {
        "kubernetes.io/hostname": node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": arch,
    }


def node_status(config: AgentConfig, kubelet_version: str, ready_since: float, now: float) -> dict:
    """The Node's status: conditions with this heartbeat, capacity, addresses, nodeInfo."""
    cap = capacity(config)
    beat, since = rfc3339(now), rfc3339(ready_since)

    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": beat,
            "lastTransitionTime": since,
        }

    arch = labels(config.node_name)["kubernetes.io/arch"]
    return {
        "capacity": cap,
        "allocatable": cap,
        "conditions": [
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond(
                "DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"
            ),
            cond(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            cond("Ready", "True", "KubeletReady", "splitserve node agent is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": config.node_ip},
            {"type": "Hostname", "address": config.node_name},
        ],
        # Nothing serves the kubelet API (kubectl logs/exec do not work); the port is nominal.
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": _read("/etc/machine-id", "splitserve"),
            "systemUUID": _read("/sys/class/dmi/id/product_uuid", "splitserve"),
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": platform.release(),
            "osImage": _os_image(),
            "containerRuntimeVersion": RUNTIME_VERSION,
            "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch,
        },
    }


def _micro_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeRegistration:
    """Registers the Node, then heartbeats its status and Lease from a background thread."""

    def __init__(self, kube: Kube, config: AgentConfig) -> None:
        self.kube = kube
        self.config = config
        self.path = f"/api/v1/nodes/{config.node_name}"
        self.lease_path = (
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{config.node_name}"
        )
        self.kubelet_version = "v0.0.0"
        self.ready_since = time.time()
        self.uid = ""
        self.allocatable: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node-heartbeat", daemon=True)

    def register(self, deadline_s: float = 120.0) -> None:
        """Create or adopt the Node and write its first status; retries until the deadline."""
        end = time.monotonic() + deadline_s
        while True:
            try:
                self._register_once()
                return
            except Exception as exc:
                if time.monotonic() > end:
                    raise RuntimeError(
                        f"could not register node {self.config.node_name}: {exc}"
                    ) from exc
                log.warning("node registration failed (%s); retrying", describe(exc))
                time.sleep(2.0)

    def _register_once(self) -> None:
        self.kubelet_version = self.kube.server_version()
        node = self.kube.get(self.path)
        if node is None:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.config.node_name,
                    "labels": labels(self.config.node_name),
                },
                "spec": {
                    "podCIDR": str(self.config.pod_cidr),
                    "podCIDRs": [str(self.config.pod_cidr)],
                },
            }
            try:
                node = self.kube.request("POST", "/api/v1/nodes", body=body)
            except Exception as exc:
                if not is_status(exc, 409):
                    raise
                node = self.kube.request("GET", self.path)
            log.info("registered node %s", self.config.node_name)
        else:
            log.info("node %s exists; taking it over", self.config.node_name)
        self.uid = node["metadata"]["uid"]
        self.heartbeat()

    def heartbeat(self) -> None:
        now = time.time()
        status = node_status(self.config, self.kubelet_version, self.ready_since, now)
        self.allocatable = status["allocatable"]
        self.kube.request(
            "PATCH", self.path + "/status", body={"status": status}, content_type=MERGE_PATCH
        )
        self._renew_lease(now)

    def _renew_lease(self, now: float) -> None:
        spec = {
            "holderIdentity": self.config.node_name,
            "leaseDurationSeconds": self.config.lease_duration_s,
            "renewTime": _micro_time(now),
        }
        try:
            self.kube.request(
                "PATCH", self.lease_path, body={"spec": spec}, content_type=MERGE_PATCH
            )
            return
        except Exception as exc:
            if not is_status(exc, 404):
                raise
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.config.node_name,
                "namespace": "kube-node-lease",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "name": self.config.node_name,
                        "uid": self.uid,
                    }
                ],
            },
            "spec": spec,
        }
        self.kube.request(
            "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body=body
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - the next beat retries
                log.warning("node heartbeat failed: %s", describe(exc))
