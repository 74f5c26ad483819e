"""Where the local cluster keeps its files, and the fixed network facts it is built on.

Everything lives under the repository's `.cache/` (so `make clean` removes it): the binaries in
`.cache/cluster/bin/`, the state (PKI, kubeconfigs, etcd data, logs, pid files, the node agent's
folder) in `.cache/cluster/state/`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

# The programs `cluster/go/build.sh` builds, in start order.
PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")
NODE_AGENT = "node-agent"


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster's addresses and ports: one node, one bridge, fixed ranges.

    The node agent and the docs rely on these exact values (see docs/testing.md); they are not
    meant to be tuned per run. etcd listens on non-default loopback ports so it never collides with
    a development etcd on 2379.
    """

    node_name: str = "splitserve-node-0"
    bridge: str = "ssbr0"
    host_ip: str = "10.244.0.1"
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    apiserver_port: int = 6443
    etcd_client_port: int = 12379
    etcd_peer_port: int = 12380
    controller_manager_port: int = 10257
    scheduler_port: int = 10259
    proxy_healthz_port: int = 10256
    proxy_metrics_port: int = 10249
    netns_prefix: str = "ss-"
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        pods = ipaddress.ip_network(self.pod_cidr)
        if ipaddress.ip_address(self.host_ip) not in pods:
            raise ValueError(f"host_ip {self.host_ip} is not in pod_cidr {self.pod_cidr}")
        ipaddress.ip_network(self.service_cidr)

    @property
    def host_cidr(self) -> str:
        """The bridge's address with the pod network's prefix length, e.g. 10.244.0.1/24."""
        return f"{self.host_ip}/{ipaddress.ip_network(self.pod_cidr).prefixlen}"

    @property
    def kubernetes_service_ip(self) -> str:
        """The first address of the service range: the `kubernetes` Service's ClusterIP."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def apiserver_url(self) -> str:
        """How host-side clients (kubectl, the controllers, the node agent) reach the API."""
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_client_port}"


@dataclass(frozen=True)
class Layout:
    """Paths of one checkout's cluster: binaries, state, logs, pid files."""

    root: Path

    @classmethod
    def for_checkout(cls, root: Path | None = None) -> Layout:
        """The layout of the checkout `root`, or of the one this package was loaded from."""
        root = root if root is not None else Path(__file__).resolve().parents[2]
        root = root.resolve()
        if not (root / "cluster" / "go" / "build.sh").is_file():
            raise ValueError(f"{root} is not a splitserve checkout (no cluster/go/build.sh)")
        return cls(root)

    @property
    def build_script(self) -> Path:
        return self.root / "cluster" / "go" / "build.sh"

    @property
    def bin_dir(self) -> Path:
        return self.root / ".cache" / "cluster" / "bin"

    @property
    def state(self) -> Path:
        return self.root / ".cache" / "cluster" / "state"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def kubeconfigs(self) -> Path:
        return self.state / "kubeconfigs"

    @property
    def config(self) -> Path:
        """Component configuration files (kube-proxy, kube-scheduler), rewritten on every `up`."""
        return self.state / "config"

    @property
    def etcd_data(self) -> Path:
        return self.state / "etcd"

    @property
    def node_state(self) -> Path:
        return self.state / "node"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.kubeconfig("admin")

    def binary(self, program: str) -> Path:
        return self.bin_dir / program

    def kubeconfig(self, identity: str) -> Path:
        return self.kubeconfigs / f"{identity}.kubeconfig"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"
