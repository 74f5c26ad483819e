"""Scenario g: the router's Role and the operator's ClusterRole are least privilege, for real.

Each identity acts with its own service-account token (TokenRequest, as its pod would get it) on
the real API server under RBAC: what it was granted works, a verb or resource it was not granted
is refused with 403. The rules themselves hold no wildcard and no write the component never makes.
The InferenceService's pods stay Pending (a nodeSelector no node has): only its RBAC matters here.
"""

from __future__ import annotations

from collections.abc import Callable

import e2e_support as S
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from splitserve.cluster.controlplane.testing import ClusterHandle

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

OPERATOR_ACCOUNT = "splitserve-operator"  # the chart's full name for this release


def as_account(
    cluster: ClusterHandle, core: client.CoreV1Api, namespace: str, account: str
) -> client.ApiClient:
    """An API client holding a fresh token of ``namespace/account`` (TokenRequest)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    token = core.create_namespaced_service_account_token(account, namespace, request).status.token
    config = client.Configuration()
    config.host = cluster.spec.apiserver_url
    config.ssl_ca_cert = str(cluster.layout.pki / "ca.crt")
    config.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(config)


def refused(call: Callable[[], object]) -> bool:
    try:
        call()
    except ApiException as exc:
        if exc.status == 403:
            return True
        raise
    return False


def test_router_role_allows_discovery_only(
    namespaces: S.Namespaces, cluster: ClusterHandle, core, custom, api
) -> None:
    ns = namespaces.create("rbac", model_claim=False)
    other = namespaces.create("rbac-other", model_claim=False)
    body = S.isvc_body("chat", prefill=1, decode=1, pending=("prefill", "decode", "router"))
    S.Isvc.create(custom, ns, body)
    rbac = client.RbacAuthorizationV1Api(api)
    role = S.wait_for_object(lambda: rbac.read_namespaced_role("chat-router", ns), "Role")
    S.wait_for_object(lambda: rbac.read_namespaced_role_binding("chat-router", ns), "RoleBinding")
    for rule in role.rules:
        assert set(rule.verbs) <= {"get", "list", "watch"}, rule
        assert "*" not in rule.resources and "*" not in (rule.api_groups or []), rule

    router = as_account(cluster, core, ns, "chat-router")
    rcore, rdisc = client.CoreV1Api(router), client.DiscoveryV1Api(router)
    # Granted: what discovery reads.
    rdisc.list_namespaced_endpoint_slice(ns)
    rcore.list_namespaced_pod(ns)
    # Not granted: other verbs, other resources, other namespaces, cluster scope.
    assert refused(lambda: rcore.list_namespaced_secret(ns))
    assert refused(lambda: rcore.delete_collection_namespaced_pod(ns))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="x"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="x", image="x")]),
    )
    assert refused(lambda: rcore.create_namespaced_pod(ns, pod))
    assert refused(lambda: rdisc.delete_collection_namespaced_endpoint_slice(ns))
    assert refused(lambda: rcore.list_namespaced_pod(other))
    assert refused(lambda: rdisc.list_namespaced_endpoint_slice(other))
    assert refused(lambda: rcore.list_node())
    assert refused(
        lambda: client.CustomObjectsApi(router).list_namespaced_custom_object(
            S.GROUP, S.VERSION, ns, S.PLURAL
        )
    )


def test_operator_cluster_role_is_least_privilege(
    namespaces: S.Namespaces, cluster: ClusterHandle, core, api, operator: str
) -> None:
    ns = namespaces.create("rbac-op", model_claim=False)
    rbac = client.RbacAuthorizationV1Api(api)
    roles = [
        r
        for r in rbac.list_cluster_role(
            label_selector="app.kubernetes.io/name=splitserve-operator"
        ).items
    ]
    assert roles, "the chart's ClusterRoles"
    for role in roles:
        for rule in role.rules:
            assert "*" not in rule.verbs and "*" not in rule.resources, (role.metadata.name, rule)
            assert "escalate" not in rule.verbs and "bind" not in rule.verbs, rule
            if "secrets" in rule.resources:
                assert set(rule.verbs) <= {"get", "list", "watch"}, rule
            if "pods" in rule.resources:
                # patch: the autoscaler's pod-deletion-cost annotation; never create or delete
                assert set(rule.verbs) <= {"get", "list", "watch", "patch"}, rule

    op = as_account(cluster, core, operator, OPERATOR_ACCOUNT)
    ocore, oapps = client.CoreV1Api(op), client.AppsV1Api(op)
    # Granted: what reconcile does.
    client.CustomObjectsApi(op).list_cluster_custom_object(S.GROUP, S.VERSION, S.PLURAL)
    oapps.list_namespaced_deployment(ns)
    ocore.list_namespaced_pod(ns)
    # Not granted.
    assert refused(lambda: ocore.list_namespaced_secret(ns))
    assert refused(lambda: ocore.delete_collection_namespaced_pod(ns))
    assert refused(lambda: ocore.delete_namespace(ns))
    assert refused(lambda: ocore.patch_node("splitserve-node-0", {"metadata": {"labels": {}}}))
    assert refused(lambda: rbac_as(op).list_cluster_role_binding())
    binding = client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name="e2e-escalation"),
        role_ref=client.V1RoleRef(
            api_group="rbac.authorization.k8s.io", kind="ClusterRole", name="cluster-admin"
        ),
        subjects=[
            client.RbacV1Subject(kind="ServiceAccount", name=OPERATOR_ACCOUNT, namespace=operator)
        ],
    )
    assert refused(lambda: rbac_as(op).create_cluster_role_binding(binding))
    admin_role = client.V1Role(
        metadata=client.V1ObjectMeta(name="e2e-wide"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["get"])],
    )
    # RBAC's escalation check: it may write Roles, but none granting what it does not hold.
    assert refused(lambda: rbac_as(op).create_namespaced_role(ns, admin_role))


def rbac_as(api: client.ApiClient) -> client.RbacAuthorizationV1Api:
    return client.RbacAuthorizationV1Api(api)
