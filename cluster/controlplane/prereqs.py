"""What `up` needs before it starts anything, each missing piece reported as one clear line."""

from __future__ import annotations

import errno
import importlib.util
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from splitserve.cluster.controlplane import network
from splitserve.cluster.controlplane.layout import ClusterSpec, Layout

# kube-proxy (iptables mode) execs these; the nft-backed iptables on Debian is fine.
PROXY_TOOLS = ("iptables", "iptables-save", "iptables-restore", "conntrack")


@dataclass(frozen=True)
class Needs:
    """Which optional parts this `up` will start."""

    proxy: bool = True
    node: bool = True
    build: bool = True


def binaries_current(layout: Layout) -> bool:
    """Whether `cluster/go/build.sh` has built the binaries for the current go.mod/go.sum."""
    proc = subprocess.run(
        ("bash", str(layout.build_script), "--check", str(layout.bin_dir)),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.returncode == 0


def node_agent_present() -> bool:
    """Whether the node agent can be run (`python -m splitserve.cluster.nodeagent`)."""
    try:
        return importlib.util.find_spec("splitserve.cluster.nodeagent.__main__") is not None
    except ImportError:
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port (so a program we are about to start can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
    return True


def problems(
    layout: Layout, spec: ClusterSpec, needs: Needs, ports_to_bind: dict[str, int]
) -> list[str]:
    """Every reason `up` cannot proceed, one line each (empty: go ahead).

    `ports_to_bind` maps each program about to be started to the port it will listen on.
    """
    found: list[str] = []
    if not sys.platform.startswith("linux"):
        return [f"the local cluster needs Linux (network namespaces); this is {sys.platform}"]
    problem = network.netns_problem()
    if problem:
        found.append(problem)
    if shutil.which("openssl") is None:
        found.append("openssl not found (it makes the cluster's PKI): run `make cluster-deps`")
    if not binaries_current(layout):
        if not needs.build:
            found.append(
                f"control-plane binaries not built in {layout.bin_dir}: run `make cluster-bins`"
            )
        elif shutil.which("go") is None:
            found.append(
                f"control-plane binaries not built in {layout.bin_dir} and no Go toolchain to "
                "build them (install Go 1.26+, then `make cluster-bins`)"
            )
    if needs.proxy:
        missing = [tool for tool in PROXY_TOOLS if shutil.which(tool) is None]
        if missing:
            found.append(
                f"{', '.join(missing)} missing for kube-proxy: run `make cluster-deps` "
                "(or `up --no-proxy`)"
            )
    if needs.node and not node_agent_present():
        found.append(
            "node agent missing: `python -m splitserve.cluster.nodeagent` has nothing to run "
            "(`up --no-node` brings up the control plane alone)"
        )
    for name, port in ports_to_bind.items():
        host = "0.0.0.0" if port == spec.apiserver_port else "127.0.0.1"
        if not port_free(port, host):
            found.append(f"port {port} (for {name}) is in use by another program")
    return found
