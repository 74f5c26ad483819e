"""The control plane is the real thing: the pinned release, RBAC and Node authorization on,
tokens issued by the API server, and the default controllers doing their jobs.

None of these tests needs a pod to run: they pass with `scripts/cluster up --no-node`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import uuid

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from splitserve.cluster.controlplane.health import Probe
from splitserve.cluster.controlplane.pki import Pki
from splitserve.cluster.controlplane.service_url import ServiceRef, service_url
from splitserve.cluster.controlplane.testing import ClusterHandle, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

POD_LABELS = {"app": "smoke"}


def pinned_release(cluster: ClusterHandle) -> str:
    gomod = (cluster.layout.root / "cluster/go/kubernetes/go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes (v\d+\.\d+\.\d+)", gomod, re.MULTILINE)
    assert match, "k8s.io/kubernetes is not required in cluster/go/kubernetes/go.mod"
    return match.group(1)


def token_client(cluster: ClusterHandle, token: str) -> client.ApiClient:
    """A client that authenticates with a bearer token only (no client certificate)."""
    cfg = client.Configuration()
    cfg.host = cluster.spec.apiserver_url
    cfg.ssl_ca_cert = str(Pki(cluster.layout.pki).ca_cert)
    cfg.api_key = {"BearerToken": token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(cfg)


def request_token(core: client.CoreV1Api, namespace: str, account: str) -> str:
    spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    body = client.AuthenticationV1TokenRequest(spec=spec)
    return core.create_namespaced_service_account_token(account, namespace, body).status.token


def deployment(name: str, replicas: int) -> client.V1Deployment:
    container = client.V1Container(name="main", image="splitserve:test", command=["sleep", "3600"])
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=POD_LABELS),
        spec=client.V1PodSpec(containers=[container], termination_grace_period_seconds=2),
    )
    spec = client.V1DeploymentSpec(
        replicas=replicas,
        selector=client.V1LabelSelector(match_labels=POD_LABELS),
        template=template,
    )
    return client.V1Deployment(metadata=client.V1ObjectMeta(name=name), spec=spec)


def owned_by(obj: object, kind: str, uid: str) -> bool:
    refs = obj.metadata.owner_references or []
    return any(ref.kind == kind and ref.uid == uid and ref.controller for ref in refs)


def test_runs_the_pinned_release(api: client.ApiClient, cluster: ClusterHandle) -> None:
    version = client.VersionApi(api).get_code()
    assert version.git_version == pinned_release(cluster)


def test_kubectl_works_with_the_admin_kubeconfig(cluster: ClusterHandle) -> None:
    repo_kubectl = cluster.layout.root / ".cache/tools/kubectl"
    kubectl = str(repo_kubectl) if repo_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (`make tools` installs one into .cache/tools)")
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    out = subprocess.run(
        [kubectl, "get", "namespaces", "-o", "name"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "namespace/kube-system" in out.split()


def test_new_namespace_gets_service_account_and_root_ca(
    core: client.CoreV1Api, namespace: str, cluster: ClusterHandle
) -> None:
    # The namespace fixture already waited for the `default` ServiceAccount.
    cm = wait_until(
        "ConfigMap kube-root-ca.crt (root-ca-cert-publisher)",
        lambda: core.read_namespaced_config_map("kube-root-ca.crt", namespace),
    )
    assert cm.data["ca.crt"].strip() == Pki(cluster.layout.pki).ca_cert.read_text().strip()


def test_rbac_refuses_a_verb_the_role_does_not_grant(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str, cluster: ClusterHandle
) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rule = client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get"])
    rbac.create_namespaced_role(
        namespace, client.V1Role(metadata=client.V1ObjectMeta(name="pod-getter"), rules=[rule])
    )
    subject = client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
    role_ref = client.V1RoleRef(
        api_group="rbac.authorization.k8s.io", kind="Role", name="pod-getter"
    )
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="reader-gets-pods"), subjects=[subject], role_ref=role_ref
    )
    rbac.create_namespaced_role_binding(namespace, binding)

    authz = client.AuthorizationV1Api(api)
    user = f"system:serviceaccount:{namespace}:reader"

    def allowed(verb: str) -> bool:
        attrs = client.V1ResourceAttributes(namespace=namespace, verb=verb, resource="pods")
        spec = client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attrs)
        review = authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
        return review.status.allowed

    assert allowed("get")
    assert not allowed("delete")
    assert not allowed("list")

    # And for real, with a token the API server issued for that ServiceAccount.
    as_reader = client.CoreV1Api(token_client(cluster, request_token(core, namespace, "reader")))
    with pytest.raises(ApiException) as got:
        as_reader.read_namespaced_pod("no-such-pod", namespace)
    assert got.value.status == 404  # authorized, just absent
    with pytest.raises(ApiException) as deleted:
        as_reader.delete_namespaced_pod("no-such-pod", namespace)
    assert deleted.value.status == 403
    with pytest.raises(ApiException) as other_ns:
        as_reader.read_namespaced_pod("no-such-pod", "kube-system")
    assert other_ns.value.status == 403


def test_token_request_token_authenticates(
    core: client.CoreV1Api, namespace: str, cluster: ClusterHandle
) -> None:
    token = request_token(core, namespace, "default")
    review = client.AuthenticationV1Api(token_client(cluster, token)).create_self_subject_review(
        client.V1SelfSubjectReview()
    )
    info = review.status.user_info
    assert info.username == f"system:serviceaccount:{namespace}:default"
    assert "system:serviceaccounts" in info.groups

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(token_client(cluster, forged)).list_namespaced_pod(namespace)
    assert refused.value.status == 401


def test_node_identity_is_confined_by_the_node_authorizer(
    core: client.CoreV1Api, namespace: str, cluster: ClusterHandle
) -> None:
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="unrelated"), string_data={"k": "v"}),
    )
    node_api = kube_config.new_client_from_config(
        config_file=str(cluster.identity_kubeconfig("node"))
    )
    as_node = client.CoreV1Api(node_api)
    # A secret no pod on this node references: the Node authorizer says no, RBAC has no grant.
    with pytest.raises(ApiException) as refused:
        as_node.read_namespaced_secret("unrelated", namespace)
    assert refused.value.status == 403
    with pytest.raises(ApiException) as listing:
        as_node.list_namespaced_secret(namespace)
    assert listing.value.status == 403


def test_deployment_makes_replicaset_and_pods_and_gc_removes_them(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str
) -> None:
    apps = client.AppsV1Api(api)
    dep = apps.create_namespaced_deployment(namespace, deployment("smoke", replicas=2))

    def replicaset() -> client.V1ReplicaSet | None:
        items = apps.list_namespaced_replica_set(namespace).items
        return next((rs for rs in items if owned_by(rs, "Deployment", dep.metadata.uid)), None)

    rs = wait_until("ReplicaSet owned by the Deployment (deployment controller)", replicaset)

    def pods() -> list[client.V1Pod]:
        items = core.list_namespaced_pod(namespace, label_selector="app=smoke").items
        owned = [p for p in items if owned_by(p, "ReplicaSet", rs.metadata.uid)]
        return owned if len(owned) == 2 else []

    wait_until("2 Pods owned by the ReplicaSet (replicaset controller)", pods)

    apps.delete_namespaced_deployment(
        "smoke", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )
    wait_until(
        "ReplicaSet and Pods garbage-collected after the Deployment's deletion",
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not core.list_namespaced_pod(namespace).items
        ),
        timeout=180,
    )


def test_service_gets_an_endpointslice(
    api: client.ApiClient, core: client.CoreV1Api, namespace: str
) -> None:
    port = client.V1ServicePort(name="http", port=80, target_port=8080)
    svc = client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(selector={"app": "web"}, ports=[port]),
    )
    created = core.create_namespaced_service(namespace, svc)
    assert created.spec.cluster_ip.startswith("10.96.")
    discovery = client.DiscoveryV1Api(api)

    def endpoint_slice() -> client.V1EndpointSlice | None:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        ).items
        return slices[0] if slices else None

    found = wait_until("EndpointSlice for Service web (endpointslice controller)", endpoint_slice)
    assert found.metadata.labels["endpointslice.kubernetes.io/managed-by"] == (
        "endpointslice-controller.k8s.io"
    )
    assert [p.port for p in found.ports or []] in ([8080], [])


def test_kubernetes_service_points_at_the_bridge_address(
    api: client.ApiClient, cluster: ClusterHandle
) -> None:
    slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=kubernetes"
    )
    addresses = {a for s in slices.items for e in s.endpoints or [] for a in e.addresses}
    assert addresses == {cluster.spec.host_ip}


def test_cluster_ip_reaches_the_api_server_through_kube_proxy(cluster: ClusterHandle) -> None:
    """From the host, 10.96.0.1:443 is DNATed by kube-proxy's rules to 10.244.0.1:6443."""
    if not cluster.proxy:
        pytest.skip("kube-proxy is not running")
    pki = Pki(cluster.layout.pki)
    admin = Probe(
        cluster.spec.apiserver_url, pki.ca_cert, (pki.client_cert("admin"), pki.client_key("admin"))
    )
    url = service_url(admin, ServiceRef("default", "kubernetes"), "443", proxy_running=True)
    assert url == f"http://{cluster.spec.kubernetes_service_ip}:443"
    through_proxy = Probe(
        url.replace("http://", "https://") + "/readyz", ca=pki.ca_cert, cert=admin.cert
    )

    def answers() -> bool:
        return through_proxy.get()[0] == 200

    wait_until("GET https://10.96.0.1/readyz through kube-proxy", answers, timeout=120)


def test_hpa_controller_reconciles(api: client.ApiClient, namespace: str) -> None:
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("scaled", replicas=1))
    target = client.V2CrossVersionObjectReference(
        api_version="apps/v1", kind="Deployment", name="scaled"
    )
    metric = client.V2MetricSpec(
        type="Resource",
        resource=client.V2ResourceMetricSource(
            name="cpu", target=client.V2MetricTarget(type="Utilization", average_utilization=50)
        ),
    )
    hpa = client.V2HorizontalPodAutoscaler(
        metadata=client.V1ObjectMeta(name="scaled"),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=target, min_replicas=1, max_replicas=3, metrics=[metric]
        ),
    )
    autoscaling = client.AutoscalingV2Api(api)
    autoscaling.create_namespaced_horizontal_pod_autoscaler(namespace, hpa)

    def conditions() -> list[client.V2HorizontalPodAutoscalerCondition]:
        status = autoscaling.read_namespaced_horizontal_pod_autoscaler("scaled", namespace).status
        return status.conditions or []

    # No metrics API here: the controller still acts, reporting that it cannot get metrics.
    found = wait_until("HPA status conditions (horizontal-pod-autoscaler controller)", conditions)
    assert {c.type for c in found} >= {"AbleToScale"}


def test_namespace_deletion_finishes(api: client.ApiClient, core: client.CoreV1Api) -> None:
    name = f"t-gone-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(
        name, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"a": "b"})
    )
    client.AppsV1Api(api).create_namespaced_deployment(name, deployment("doomed", replicas=1))
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_until(f"namespace {name} deleted (namespace controller)", gone, timeout=240)


def test_serving_cert_verifies_for_every_name_pods_use(cluster: ClusterHandle) -> None:
    """Pods dial 10.244.0.1, 10.96.0.1 or kubernetes.default.svc[.cluster.local]: each must pass
    TLS verification against the cluster CA."""
    ctx = ssl.create_default_context(cafile=str(Pki(cluster.layout.pki).ca_cert))
    port = cluster.spec.apiserver_port
    names = [
        ("127.0.0.1", "127.0.0.1"),
        (cluster.spec.host_ip, cluster.spec.host_ip),
        ("127.0.0.1", cluster.spec.kubernetes_service_ip),
        ("127.0.0.1", "kubernetes.default.svc"),
        ("127.0.0.1", f"kubernetes.default.svc.{cluster.spec.cluster_domain}"),
    ]
    for address, server_name in names:
        with (
            socket.create_connection((address, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            assert tls.version()
