"""What an earlier agent run may have left behind, removed before this one starts.

Containers die with the agent (PR_SET_PDEATHSIG on the shim and the init), so leftovers are rare:
processes that somehow survived (killed by recorded PID and start time), tmpfs volumes mounted
under the state folder, network namespaces and veths of the agent's naming, and the per-container
scratch and volume folders. Logs stay. Pods still bound to the node are started afresh.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from splitserve.cluster.nodeagent import network, volumes
from splitserve.cluster.nodeagent.runtime import kill_recorded

log = logging.getLogger(__name__)


def leftovers(state_dir: Path) -> None:
    """Kill orphaned processes, unmount, delete namespaces and scratch folders."""
    pods = state_dir / "pods"
    killed = sum(kill_recorded(p) for p in pods.glob("*/containers/*/pids")) if pods.is_dir() else 0
    mounts = volumes.mounted_under(state_dir)
    for point in mounts:
        volumes.unmount(point)
    namespaces = network.leftovers()
    for name in namespaces:
        network.delete_namespace(name)
    if pods.is_dir():
        for pod_dir in pods.iterdir():
            for sub in ("containers", "volumes"):
                shutil.rmtree(pod_dir / sub, ignore_errors=True)
    if killed or mounts or namespaces:
        log.info(
            "cleaned up after an earlier run: %d processes, %d mounts, %d namespaces",
            killed,
            len(mounts),
            len(namespaces),
        )
