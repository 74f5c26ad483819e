"""Pods that really run: the node agent (the emulated kubelet) with the real scheduler,
controllers and kube-proxy. Skipped, with the reason, while splitserve.cluster.nodeagent is absent.

The containers run from the image's venv (no container runtime here; see docs/testing.md), so
`python` is the image's interpreter and the `image` field is not pulled.
"""

from __future__ import annotations

import ipaddress
import urllib.request

import pytest
from kubernetes import client

from splitserve.cluster.controlplane.health import Probe
from splitserve.cluster.controlplane.pki import Pki
from splitserve.cluster.controlplane.service_url import ServiceRef, service_url
from splitserve.cluster.controlplane.testing import ClusterHandle, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

IMAGE = "splitserve:dev"
# Pods start a Python from the image venv: allow for a cold start on 2 busy cores.
RUNNING_TIMEOUT_S = 300

# In-cluster configuration as a client library reads it: env, token and CA at the standard paths,
# through the `kubernetes` Service's ClusterIP (kube-proxy) with TLS verified against the CA.
IN_CLUSTER_CHECK = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
token = open(f"{sa}/token").read().strip()
namespace = open(f"{sa}/namespace").read().strip()
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
req = urllib.request.Request(
    f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps(review).encode(),
    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    method="POST",
)
user = json.load(urllib.request.urlopen(req, context=ctx, timeout=30))["status"]["userInfo"]
assert user["username"] == f"system:serviceaccount:{namespace}:default", user
print("in-cluster ok", user["username"])
"""


@pytest.fixture(autouse=True)
def _needs_node_agent(cluster: ClusterHandle) -> None:
    if not cluster.node:
        pytest.skip("the node agent (splitserve.cluster.nodeagent) is absent: no pod can run")


def web_deployment(name: str) -> client.V1Deployment:
    labels = {"app": name}
    probe = client.V1Probe(
        http_get=client.V1HTTPGetAction(path="/", port=8080), period_seconds=2, failure_threshold=3
    )
    container = client.V1Container(
        name="web",
        image=IMAGE,
        command=["python", "-m", "http.server", "8080", "--bind", "0.0.0.0"],
        ports=[client.V1ContainerPort(container_port=8080, name="http")],
        readiness_probe=probe,
    )
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(containers=[container], termination_grace_period_seconds=5),
    )
    spec = client.V1DeploymentSpec(
        replicas=1, selector=client.V1LabelSelector(match_labels=labels), template=template
    )
    return client.V1Deployment(metadata=client.V1ObjectMeta(name=name), spec=spec)


def ready_pod(core: client.CoreV1Api, namespace: str, app: str) -> client.V1Pod | None:
    for pod in core.list_namespaced_pod(namespace, label_selector=f"app={app}").items:
        conditions = pod.status.conditions or []
        if pod.status.phase == "Running" and any(
            c.type == "Ready" and c.status == "True" for c in conditions
        ):
            return pod
    return None


def admin_probe(cluster: ClusterHandle) -> Probe:
    pki = Pki(cluster.layout.pki)
    return Probe(
        cluster.spec.apiserver_url, pki.ca_cert, (pki.client_cert("admin"), pki.client_key("admin"))
    )


def test_node_is_ready(core: client.CoreV1Api, cluster: ClusterHandle) -> None:
    node = core.read_node(cluster.spec.node_name)
    ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
    assert ready and ready[0].status == "True"


def test_deployment_pod_runs_and_its_service_answers_from_the_host(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str, cluster: ClusterHandle
) -> None:
    client.AppsV1Api(api).create_namespaced_deployment(namespace, web_deployment("web"))
    port = client.V1ServicePort(name="http", port=80, target_port="http")
    core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[port]),
        ),
    )
    pod = wait_until(
        "web pod Running and Ready (scheduler + node agent + readiness probe)",
        lambda: ready_pod(core, namespace, "web"),
        timeout=RUNNING_TIMEOUT_S,
    )
    assert pod.spec.node_name == cluster.spec.node_name
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(cluster.spec.pod_cidr)

    url = service_url(admin_probe(cluster), ServiceRef(namespace, "web"), None, cluster.proxy)

    def answers() -> bool:
        with urllib.request.urlopen(url + "/", timeout=10) as resp:
            return resp.status == 200

    wait_until(f"GET {url}/ through the Service", answers, timeout=120)


def test_pod_uses_in_cluster_config_through_the_cluster_ip(
    core: client.CoreV1Api, namespace: str
) -> None:
    container = client.V1Container(
        name="check", image=IMAGE, command=["python", "-c", IN_CLUSTER_CHECK]
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="in-cluster"),
        spec=client.V1PodSpec(containers=[container], restart_policy="Never"),
    )
    core.create_namespaced_pod(namespace, pod)

    def finished() -> str | None:
        phase = core.read_namespaced_pod("in-cluster", namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until("in-cluster pod finished", finished, timeout=RUNNING_TIMEOUT_S)
    assert phase == "Succeeded", core.read_namespaced_pod("in-cluster", namespace).status


def test_deleting_the_deployment_stops_its_running_pod(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str
) -> None:
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, web_deployment("short"))
    wait_until(
        "short pod Running and Ready",
        lambda: ready_pod(core, namespace, "short"),
        timeout=RUNNING_TIMEOUT_S,
    )
    apps.delete_namespaced_deployment(
        "short", namespace, body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    wait_until(
        "the Deployment, its ReplicaSet and its running Pod all gone (GC + node agent)",
        lambda: (
            not apps.list_namespaced_deployment(namespace).items
            and not apps.list_namespaced_replica_set(namespace).items
            and not core.list_namespaced_pod(namespace).items
        ),
        timeout=180,
    )
