"""Helpers for the test suites that run against the local cluster (tests/cluster, tests/e2e).

`cluster_session()` is the body of a session-scoped fixture: it reuses a healthy cluster or
brings one up (the node agent too, when its module is present), and takes down at the end only
what it brought up (unless SPLITSERVE_KEEP_CLUSTER=1). Where the cluster cannot run here (not
root, binaries not built) the tests skip with the reason, unless SPLITSERVE_REQUIRE_CLUSTER=1
(set by `make e2e` and `make test`), where they fail instead: CI never passes by skipping.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from splitserve.cluster.controlplane import network, prereqs
from splitserve.cluster.controlplane.cluster import Cluster, ClusterError, UpOptions
from splitserve.cluster.controlplane.layout import PROGRAMS, ClusterSpec, Layout

REQUIRE_ENV = "SPLITSERVE_REQUIRE_CLUSTER"
KEEP_ENV = "SPLITSERVE_KEEP_CLUSTER"
NODE_ENV = "SPLITSERVE_CLUSTER_NODE"
# Generous: 2 shared cores, and a first boot also bootstraps RBAC and the default objects.
UP_TIMEOUT_S = 300.0
LOG_TAIL_LINES = 15

T = TypeVar("T")


@dataclass(frozen=True)
class ClusterHandle:
    """What a test needs to know about the running cluster."""

    layout: Layout
    spec: ClusterSpec
    node: bool  # whether the node agent runs (pods get to Running)
    proxy: bool  # whether kube-proxy runs (ClusterIPs reachable)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.admin_kubeconfig

    def identity_kubeconfig(self, identity: str) -> Path:
        return self.layout.kubeconfig(identity)


def unavailable_reason(layout: Layout) -> str | None:
    """Why the cluster cannot run on this machine, or None."""
    problem = network.netns_problem()
    if problem:
        return problem
    if not prereqs.binaries_current(layout):
        return f"control-plane binaries not built in {layout.bin_dir}: run `make cluster-bins`"
    return None


def cluster_session(layout: Layout | None = None) -> Iterator[ClusterHandle]:
    """Yield a running cluster (see the module docstring); use in a session-scoped fixture."""
    layout = layout or Layout.for_checkout()
    reason = unavailable_reason(layout)
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"the local cluster cannot run ({REQUIRE_ENV}=1): {reason}")
        pytest.skip(f"the local cluster cannot run here: {reason}")
    lines: list[str] = []
    cluster = Cluster(layout, out=lines.append)
    # SPLITSERVE_CLUSTER_NODE=0: the control plane alone, even where the node agent exists.
    node = prereqs.node_agent_present() and os.environ.get(NODE_ENV) != "0"
    was_running = {name for name in (*PROGRAMS, "node-agent") if cluster.pid(name) is not None}
    options = UpOptions(node=node, proxy=True, build=False, timeout=UP_TIMEOUT_S)
    try:
        cluster.up(options)
    except ClusterError as exc:
        said = "\n".join(lines)
        pytest.fail(f"scripts/cluster up failed: {exc}\n{said}\n{log_tails(layout)}")
    try:
        yield ClusterHandle(layout, cluster.spec, node=node, proxy=options.proxy)
    finally:
        if not was_running and os.environ.get(KEEP_ENV) != "1":
            cluster.down()


def log_tails(layout: Layout, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of every program's log, for a failure message."""
    parts = []
    for log in sorted(layout.logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_until(
    what: str, check: Callable[[], T | None], timeout: float = 120.0, interval: float = 0.5
) -> T:
    """Poll `check` until it returns something truthy and return that; fail the test naming
    `what` after `timeout` s. Exceptions from `check` count as "not yet" (the last one is
    reported)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled until the deadline, reported then
            last = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last!r})" if last else ""
            pytest.fail(f"{what}: not true after {timeout:.0f} s{detail}")
        time.sleep(interval)
