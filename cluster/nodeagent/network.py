"""Pod networking: a named network namespace per pod, a veth pair into the host bridge.

Each pod gets `ip netns` namespace `ss-<uid[:8]>` (so /run/netns/<name> holds it open between
container restarts, as the pause container does), with `eth0` carrying its IP and a default route
via the bridge's address, and `lo` up. The host end `vss<uid[:8]>` joins the bridge, so the host
and every pod reach each other directly, and pods reach the API server at the gateway address.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_PREFIX = "ss-"
VETH_PREFIX = "vss"
NETNS_DIR = Path("/run/netns")


class NetworkError(Exception):
    """A pod's network could not be set up."""


@dataclass(frozen=True)
class PodNetwork:
    """A pod's network sandbox: namespace, host-side veth and address."""

    netns: str
    host_veth: str
    ip: ipaddress.IPv4Address

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def names(uid: str) -> tuple[str, str]:
    """The netns and host veth names of a pod (veth names are at most 15 characters)."""
    short = uid.replace("-", "")[:8]
    return NETNS_PREFIX + short, VETH_PREFIX + short


def netns_path(uid: str) -> Path:
    return NETNS_DIR / names(uid)[0]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def check_bridge(bridge: str) -> None:
    """Fail clearly when the host bridge is missing (scripts/cluster up makes it)."""
    if _ip("link", "show", bridge, check=False).returncode != 0:
        raise NetworkError(f"bridge {bridge!r} does not exist (scripts/cluster up creates it)")


def setup(
    uid: str,
    ip: ipaddress.IPv4Address,
    cidr: ipaddress.IPv4Network,
    gateway: ipaddress.IPv4Address,
    bridge: str,
) -> PodNetwork:
    """Create (or re-create) the pod's namespace and veth; idempotent."""
    netns, veth = names(uid)
    teardown(uid)
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", bridge)
        # Hairpin: with bridge netfilter on, a pod reaching its own Service (kube-proxy DNATs the
        # ClusterIP back to the pod) gets the reply only through the port it came in on.
        _ip("link", "set", veth, "type", "bridge_slave", "hairpin", "on")
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/{cidr.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "default", "via", str(gateway))
    except Exception:
        teardown(uid)
        raise
    return PodNetwork(netns, veth, ip)


def teardown(uid: str) -> None:
    """Delete the pod's namespace (its eth0 goes with it, and so does the host end)."""
    netns, veth = names(uid)
    if (NETNS_DIR / netns).exists():
        _ip("netns", "delete", netns, check=False)
    if _ip("link", "show", veth, check=False).returncode == 0:
        _ip("link", "delete", veth, check=False)


def leftovers() -> list[str]:
    """Namespaces of this agent's naming left behind by an earlier run."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX))


def delete_namespace(name: str) -> None:
    """Remove one leftover namespace and its host veth."""
    _ip("netns", "delete", name, check=False)
    veth = VETH_PREFIX + name.removeprefix(NETNS_PREFIX)
    if _ip("link", "show", veth, check=False).returncode == 0:
        _ip("link", "delete", veth, check=False)
