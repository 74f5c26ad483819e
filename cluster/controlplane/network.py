"""Host networking for the pods: one Linux bridge with the gateway address, forwarding on.

The node agent attaches one veth per pod to the bridge and gives each pod an address in the pod
range; the host reaches every pod directly (the bridge is a local interface), and kube-proxy's
iptables rules turn ClusterIP traffic from the host or from a pod into pod traffic.
`bridge-nf-call-iptables` makes bridged pod-to-pod frames pass those rules too: without it the
reply of a pod reached through a Service on the same bridge would skip the reverse NAT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from splitserve.cluster.controlplane.layout import ClusterSpec

SYSCTL = Path("/proc/sys")


class NetworkError(RuntimeError):
    """An `ip` command failed; the message names the command and its error."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS...` (iproute2) with a timeout; raise NetworkError when `check` and it fails."""
    proc = subprocess.run(("ip", *args), capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def netns_problem() -> str | None:
    """None when this process may create network namespaces, else one line saying why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) not found: run `make cluster-deps`"
    if os.geteuid() != 0:
        return "not root: the bridge and the pods' network namespaces need root"
    probe = f"ss-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace (`ip netns add`): {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def ensure_host_network(spec: ClusterSpec) -> list[str]:
    """Create the bridge with the gateway address (once), enable forwarding and bridge netfilter.

    Returns notes worth printing (e.g. bridge netfilter unavailable); raises NetworkError when
    the bridge cannot be made.
    """
    notes: list[str] = []
    if ip("link", "show", "dev", spec.bridge, check=False).returncode != 0:
        ip("link", "add", spec.bridge, "type", "bridge")
    addrs = json.loads(ip("-j", "addr", "show", "dev", spec.bridge).stdout or "[]")
    have = {
        f"{a['local']}/{a['prefixlen']}"
        for link in addrs
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    }
    if spec.host_cidr not in have:
        ip("addr", "add", spec.host_cidr, "dev", spec.bridge)
    ip("link", "set", spec.bridge, "up")
    _sysctl("net/ipv4/ip_forward", "1")
    if not (SYSCTL / "net/bridge").is_dir() and shutil.which("modprobe"):
        subprocess.run(("modprobe", "br_netfilter"), capture_output=True, timeout=30, check=False)
    if (SYSCTL / "net/bridge/bridge-nf-call-iptables").exists():
        _sysctl("net/bridge/bridge-nf-call-iptables", "1")
    else:
        notes.append(
            "bridge netfilter unavailable (no br_netfilter): a pod reaching a Service backed by "
            "a pod on the same bridge may not get replies"
        )
    return notes


def leftover_namespaces(spec: ClusterSpec) -> list[str]:
    """Names of network namespaces with the cluster's prefix (pods the node agent left)."""
    proc = ip("netns", "list", check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(spec.netns_prefix)]


def delete_namespace(name: str) -> None:
    """Kill whatever still runs in the namespace, then delete it (its veth pair goes with it)."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", name, check=False)


def teardown_host_network(spec: ClusterSpec) -> list[str]:
    """Remove leftover pod namespaces, any interface still attached to the bridge, the bridge.

    Idempotent; returns what it removed, for the `down` report.
    """
    removed: list[str] = []
    if shutil.which("ip") is None:
        return removed
    for name in leftover_namespaces(spec):
        delete_namespace(name)
        removed.append(f"netns {name}")
    if ip("link", "show", "dev", spec.bridge, check=False).returncode == 0:
        ports = json.loads(ip("-j", "link", "show", "master", spec.bridge).stdout or "[]")
        for port in ports:
            ip("link", "del", port["ifname"], check=False)
            removed.append(f"link {port['ifname']}")
        ip("link", "del", spec.bridge, check=False)
        removed.append(f"bridge {spec.bridge}")
    return removed


def remove_kube_firewall() -> list[str]:
    """Remove the KUBE-FIREWALL filter chain kube-proxy adds and `kube-proxy --cleanup` leaves
    (on a real node kubelet owns it too); returns what it removed."""
    removed = []
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue

        def run(*args: str, tool: str = tool) -> int:
            argv = (tool, "-w", "5", *args)
            return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode

        if run("-t", "filter", "-L", "KUBE-FIREWALL", "-n") != 0:
            continue
        for chain in ("INPUT", "OUTPUT"):
            while run("-t", "filter", "-D", chain, "-j", "KUBE-FIREWALL") == 0:
                pass
        run("-t", "filter", "-F", "KUBE-FIREWALL")
        run("-t", "filter", "-X", "KUBE-FIREWALL")
        removed.append(f"{tool} KUBE-FIREWALL")
    return removed


def bridge_state(spec: ClusterSpec) -> str:
    """One line for `status`: the bridge, its address, bridge netfilter."""
    if ip("link", "show", "dev", spec.bridge, check=False).returncode != 0:
        return f"bridge {spec.bridge}: absent"
    nf = SYSCTL / "net/bridge/bridge-nf-call-iptables"
    nf_state = nf.read_text().strip() if nf.exists() else "unavailable"
    ports = json.loads(ip("-j", "link", "show", "master", spec.bridge).stdout or "[]")
    return (
        f"bridge {spec.bridge}: {spec.host_cidr}, {len(ports)} pod port(s), "
        f"bridge-nf-call-iptables={nf_state}"
    )


def _sysctl(key: str, value: str) -> None:
    path = SYSCTL / key
    if path.read_text().strip() != value:
        path.write_text(value)
