"""The agent's settings: command-line flags turned into one frozen, validated object."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from splitserve.cluster import image


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent's parts share; built once from the flags, never mutated."""

    kubeconfig: Path
    node_name: str
    bridge: str
    pod_cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    state_dir: Path
    apiserver_host: str
    apiserver_port: int
    ca_file: Path
    image_dir: Path
    build_image: bool = True
    # What pods see as KUBERNETES_SERVICE_HOST/PORT: None = the `kubernetes` Service's ClusterIP
    # (as kubelet; needs kube-proxy), "apiserver" = the API server's address, or "HOST:PORT".
    kubernetes_service: str | None = None
    cpu_capacity: str = "16"
    memory_capacity: str | None = None  # None: the host's memory, at least 64Gi
    max_pods: int = 110
    backoff_initial_s: float = 10.0  # kubelet's crash-loop back-off: 10 s doubling ...
    backoff_max_s: float = 300.0  # ... up to 5 minutes
    heartbeat_s: float = 10.0
    lease_duration_s: int = 40
    api_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        if self.gateway not in self.pod_cidr:
            raise ValueError(f"gateway {self.gateway} is outside the pod CIDR {self.pod_cidr}")
        if not self.state_dir.is_absolute() or not self.image_dir.is_absolute():
            raise ValueError("state_dir and image_dir must be absolute")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")

    def kubernetes_service_address(self, cluster_ip: tuple[str, int] | None) -> tuple[str, int]:
        """KUBERNETES_SERVICE_HOST/PORT for pods, given the Service's ClusterIP if there is one."""
        if self.kubernetes_service == "apiserver" or (
            self.kubernetes_service is None and cluster_ip is None
        ):
            return self.apiserver_host, self.apiserver_port
        if self.kubernetes_service is None:
            assert cluster_ip is not None
            return cluster_ip
        host, _, port = self.kubernetes_service.rpartition(":")
        return host, int(port)

    @property
    def node_ip(self) -> str:
        """The node's InternalIP: the gateway on the bridge, which pods and the host both reach."""
        return str(self.gateway)

    @property
    def pods_dir(self) -> Path:
        return self.state_dir / "pods"


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    """Flags of `python -P -m splitserve.cluster.nodeagent`; relative paths resolve from cwd."""
    p = argparse.ArgumentParser(prog="python -P -m splitserve.cluster.nodeagent")
    p.add_argument("--kubeconfig", type=Path, required=True, help="the node's kubeconfig")
    p.add_argument("--node-name", required=True)
    p.add_argument("--bridge", required=True, help="host bridge the pods' veths join")
    p.add_argument("--pod-cidr", required=True, type=ipaddress.IPv4Network)
    p.add_argument("--gateway", required=True, type=ipaddress.IPv4Address)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--apiserver-host", required=True)
    p.add_argument("--apiserver-port", required=True, type=int)
    p.add_argument("--ca-file", required=True, type=Path, help="cluster CA (pods' ca.crt)")
    p.add_argument(
        "--image-dir",
        type=Path,
        default=image.REPO / image.IMAGE_DIR,
        help="where the image venv is built (default: %(default)s)",
    )
    p.add_argument(
        "--no-build-image",
        dest="build_image",
        action="store_false",
        help="use the image as built; do not refresh it at start",
    )
    p.add_argument(
        "--kubernetes-service",
        metavar="HOST:PORT",
        help="KUBERNETES_SERVICE_HOST:PORT for pods: `apiserver` for the API server's own "
        "address (no kube-proxy), or HOST:PORT (default: the `kubernetes` Service's ClusterIP, "
        "as kubelet; the API server's address while that Service does not exist)",
    )
    p.add_argument("--cpu-capacity", default="16", help="advertised CPUs (not enforced)")
    p.add_argument("--memory-capacity", help="advertised memory (default: host's, >= 64Gi)")
    p.add_argument("--max-pods", type=int, default=110)
    p.add_argument("--backoff-initial", type=float, default=10.0, help="seconds")
    p.add_argument("--backoff-max", type=float, default=300.0, help="seconds")
    p.add_argument("--heartbeat", type=float, default=10.0, help="node status / lease period")
    a = p.parse_args(argv)
    return AgentConfig(
        kubeconfig=a.kubeconfig.resolve(),
        node_name=a.node_name,
        bridge=a.bridge,
        pod_cidr=a.pod_cidr,
        gateway=a.gateway,
        state_dir=a.state_dir.resolve(),
        apiserver_host=a.apiserver_host,
        apiserver_port=a.apiserver_port,
        ca_file=a.ca_file.resolve(),
        image_dir=a.image_dir.resolve(),
        build_image=a.build_image,
        kubernetes_service=a.kubernetes_service,
        cpu_capacity=a.cpu_capacity,
        memory_capacity=a.memory_capacity,
        max_pods=a.max_pods,
        backoff_initial_s=a.backoff_initial,
        backoff_max_s=a.backoff_max,
        heartbeat_s=a.heartbeat,
    )
