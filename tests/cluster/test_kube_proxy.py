"""kube-proxy's rules carry ClusterIP traffic on this host, with no node agent involved.

Two network namespaces attached to the bridge stand in for pods (as the node agent makes them);
a selector-less Service with a hand-written EndpointSlice points at a server in the first. The
Service's ClusterIP must answer from the host, from the other "pod" (across the bridge: bridge
netfilter), and from the serving "pod" itself (hairpin).
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kubernetes import client

from splitserve.cluster.controlplane.testing import ClusterHandle, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PORT = 8080
# Addresses at the top of the pod range, away from where the node agent's IPAM starts.
CANDIDATES = range(250, 240, -1)


@dataclass(frozen=True)
class FakePod:
    netns: str
    ip: str

    def fetch(self, url: str) -> subprocess.CompletedProcess[str]:
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).status)"
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-P", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status == 200


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def used_ips(core: client.CoreV1Api) -> set[str]:
    return {p.status.pod_ip for p in core.list_pod_for_all_namespaces().items if p.status.pod_ip}


@pytest.fixture
def fake_pods(cluster: ClusterHandle, core: client.CoreV1Api) -> Iterator[list[FakePod]]:
    if not cluster.proxy:
        pytest.skip("kube-proxy is not running")
    net = ipaddress.ip_network(cluster.spec.pod_cidr)
    free = [str(net[i]) for i in CANDIDATES if str(net[i]) not in used_ips(core)]
    tag = uuid.uuid4().hex[:6]
    pods = [FakePod(f"{cluster.spec.netns_prefix}t{tag}{n}", free[n]) for n in range(2)]
    try:
        for n, pod in enumerate(pods):
            veth = f"sst{tag}{n}"
            ip("netns", "add", pod.netns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
            ip("link", "set", veth, "master", cluster.spec.bridge)
            ip("link", "set", veth, "type", "bridge_slave", "hairpin", "on")
            ip("link", "set", veth, "up")
            ip("-n", pod.netns, "link", "set", "lo", "up")
            ip("-n", pod.netns, "addr", "add", f"{pod.ip}/{net.prefixlen}", "dev", "eth0")
            ip("-n", pod.netns, "link", "set", "eth0", "up")
            ip("-n", pod.netns, "route", "add", "default", "via", cluster.spec.host_ip)
        yield pods
    finally:
        for pod in pods:
            pids = subprocess.run(
                ["ip", "netns", "pids", pod.netns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], check=False)
            subprocess.run(["ip", "netns", "del", pod.netns], check=False, capture_output=True)


@pytest.fixture
def server(fake_pods: list[FakePod]) -> Iterator[FakePod]:
    pod = fake_pods[0]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, "-P", "-m", "http.server",
         str(PORT), "--bind", pod.ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield pod
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_cluster_ip_reaches_a_pod_from_host_pod_and_itself(
    api: client.ApiClient,
    core: client.CoreV1Api,
    namespace: str,
    fake_pods: list[FakePod],
    server: FakePod,
) -> None:
    svc = core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="manual"),
            spec=client.V1ServiceSpec(
                ports=[client.V1ServicePort(name="http", port=80, target_port=PORT)]
            ),
        ),
    )
    endpoints = client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(
            name="manual-1",
            labels={
                "kubernetes.io/service-name": "manual",
                "endpointslice.kubernetes.io/managed-by": "splitserve-tests",
            },
        ),
        address_type="IPv4",
        endpoints=[
            client.V1Endpoint(
                addresses=[server.ip], conditions=client.V1EndpointConditions(ready=True)
            )
        ],
        ports=[client.DiscoveryV1EndpointPort(name="http", port=PORT, protocol="TCP")],
    )
    client.DiscoveryV1Api(api).create_namespaced_endpoint_slice(namespace, endpoints)
    url = f"http://{svc.spec.cluster_ip}:80/"

    direct = f"http://{server.ip}:{PORT}/"
    wait_until(f"{direct} from the host (over the bridge)", lambda: http_ok(direct), timeout=60)
    wait_until(f"{url} from the host (kube-proxy nat OUTPUT)", lambda: http_ok(url), timeout=120)
    other, itself = fake_pods[1], server
    wait_until(
        f"{url} from another pod on the bridge",
        lambda: other.fetch(url).stdout.strip() == "200",
        timeout=60,
    )
    wait_until(
        f"{url} from the serving pod itself (hairpin)",
        lambda: itself.fetch(url).stdout.strip() == "200",
        timeout=60,
    )
