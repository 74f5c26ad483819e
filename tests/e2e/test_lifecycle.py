"""Scenarios e and f: deletion by the garbage collector, and specs that are refused or degrade.

e. `kubectl delete isvc` removes every child: the operator's own objects, and the ReplicaSets and
   pods below its Deployments, which only the garbage collector removes (the operator deletes
   Deployments, in the background). Then the same with the operator stopped: the InferenceService
   goes once its finalizer is removed by hand (docs/operator.md) and the garbage collector alone
   collects every child, by their owner references. Engine pods are kept Pending (a nodeSelector
   no node has) so no engine starts; the router pod runs.
f. Invalid InferenceServices are refused by the API server itself (the CRD's schema), naming the
   field; one that passes the schema but cannot work (a model path missing on its volume) turns
   Degraded with reason PodsFailing, the engine's own error in the message, and a Warning Event.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import e2e_support as S
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from splitserve.cluster.controlplane.testing import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

OPERATOR_SELECTOR = "app.kubernetes.io/name=splitserve-operator"
CHILD_LISTS = {
    "Deployment": lambda api, ns: client.AppsV1Api(api).list_namespaced_deployment(ns),
    "ReplicaSet": lambda api, ns: client.AppsV1Api(api).list_namespaced_replica_set(ns),
    "Pod": lambda api, ns: client.CoreV1Api(api).list_namespaced_pod(ns),
    "Service": lambda api, ns: client.CoreV1Api(api).list_namespaced_service(ns),
    "ConfigMap": lambda api, ns: client.CoreV1Api(api).list_namespaced_config_map(ns),
    "ServiceAccount": lambda api, ns: client.CoreV1Api(api).list_namespaced_service_account(ns),
    "Role": lambda api, ns: client.RbacAuthorizationV1Api(api).list_namespaced_role(ns),
    "RoleBinding": lambda api, ns: client.RbacAuthorizationV1Api(api).list_namespaced_role_binding(
        ns
    ),
    "PodDisruptionBudget": lambda api, ns: client.PolicyV1Api(
        api
    ).list_namespaced_pod_disruption_budget(ns),
    "NetworkPolicy": lambda api, ns: client.NetworkingV1Api(api).list_namespaced_network_policy(ns),
}
EXPECTED_KINDS = {
    "Deployment": 3, "ReplicaSet": 3, "Pod": 3, "Service": 3, "ConfigMap": 1,
    "ServiceAccount": 2, "Role": 1, "RoleBinding": 1, "PodDisruptionBudget": 3,
    "NetworkPolicy": 1,
}  # fmt: skip


def descendants(api: client.ApiClient, ns: str, owner_uid: str) -> dict[str, tuple[str, str]]:
    """uid -> (kind, name) of every object owned, directly or not, by ``owner_uid``."""
    objects = []
    for kind, lister in CHILD_LISTS.items():
        for obj in lister(api, ns).items:
            refs = [r.uid for r in obj.metadata.owner_references or []]
            objects.append((obj.metadata.uid, kind, obj.metadata.name, refs))
    found: dict[str, tuple[str, str]] = {}
    frontier = {owner_uid}
    while frontier:
        nxt = set()
        for uid, kind, name, refs in objects:
            if uid not in found and frontier & set(refs):
                found[uid] = (kind, name)
                nxt.add(uid)
        frontier = nxt
    return found


def remaining(api: client.ApiClient, ns: str, uids: set[str]) -> list[tuple[str, str]]:
    left = []
    for kind, lister in CHILD_LISTS.items():
        left += [(kind, o.metadata.name) for o in lister(api, ns).items if o.metadata.uid in uids]
    return left


def _wait_children(api: client.ApiClient, ns: str, uid: str) -> dict[str, tuple[str, str]]:
    def complete() -> dict[str, tuple[str, str]] | None:
        found = descendants(api, ns, uid)
        kinds: dict[str, int] = {}
        for kind, _ in found.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        return found if kinds == EXPECTED_KINDS else None

    return wait_until("every child of the InferenceService", complete, timeout=180)


def _scale_operator(kubeconfig: Path, operator: str, replicas: int) -> None:
    args = [
        "scale",
        "deployment",
        "-n",
        operator,
        "-l",
        OPERATOR_SELECTOR,
        f"--replicas={replicas}",
    ]
    S.checked(S.run_tool("kubectl", *args, kubeconfig=kubeconfig))


def test_delete_collects_every_child(
    namespaces: S.Namespaces, api, core, custom, kubeconfig: Path, operator: str
) -> None:
    ns = namespaces.create("gc", model_claim=False)
    body = S.isvc_body("chat", prefill=1, decode=1, pending=("prefill", "decode"))
    isvc = S.Isvc.create(custom, ns, body)
    children = _wait_children(api, ns, isvc.get()["metadata"]["uid"])
    wait_until(
        "the router pod running",
        lambda: any(p.status.phase == "Running" for p in S.engine_pods(core, ns, "chat", "router")),
        timeout=180,
    )

    # With the operator: its finalizer deletes its children, the garbage collector the rest.
    delete = ["delete", "ssvc", "chat", "-n", ns, "--timeout=120s"]
    S.checked(S.run_tool("kubectl", *delete, kubeconfig=kubeconfig))
    wait_until(
        "every child gone",
        lambda: not remaining(api, ns, set(children)),
        timeout=180,
    )

    # Without the operator: the garbage collector alone, by owner references.
    isvc = S.Isvc.create(custom, ns, body)
    children = _wait_children(api, ns, isvc.get()["metadata"]["uid"])
    _scale_operator(kubeconfig, operator, 0)
    try:
        wait_until(
            "the operator stopped",
            lambda: not core.list_namespaced_pod(operator, label_selector=OPERATOR_SELECTOR).items,
            timeout=120,
        )
        isvc.delete()
        obj = isvc.get()
        assert obj["metadata"].get("deletionTimestamp")  # held by the operator's finalizer
        assert remaining(api, ns, set(children))
        isvc.patch({"metadata": {"finalizers": None}})

        def isvc_gone() -> bool:
            try:
                isvc.get()
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_until("the InferenceService gone", isvc_gone, timeout=60)
        wait_until(
            "every child collected by the garbage collector",
            lambda: not remaining(api, ns, set(children)),
            timeout=180,
        )
    finally:
        _scale_operator(kubeconfig, operator, 2)  # the chart's replicas
        wait_until(
            "the operator back",
            lambda: any(
                S.pod_ready(p)
                for p in core.list_namespaced_pod(operator, label_selector=OPERATOR_SELECTOR).items
            ),
            timeout=180,
        )


INVALID = {
    "spec.engine.blockSize": {"engine": {"blockSize": 17}},
    "spec.decode.replicas": {"decode": {"replicas": -1}},
    "spec.kvTransfer.transport": {"kvTransfer": {"transport": "rdma"}},
    "spec.model.uri": {"model": {"uri": None}},
    "spec.bogus": {"bogus": True},
}


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def empty_namespace(namespaces: S.Namespaces) -> str:
    return namespaces.create("bad", model_claim=False)


@pytest.mark.parametrize("field", list(INVALID))
def test_invalid_spec_is_refused_by_the_api_server(
    field: str, empty_namespace: str, custom, kubeconfig: Path
) -> None:
    ns = empty_namespace
    body = S.isvc_body("bad", prefill=1, decode=1)
    body["spec"] = _merge(body["spec"], INVALID[field])
    apply = ["apply", "-n", ns, "-f", "-"]
    proc = S.run_tool("kubectl", *apply, kubeconfig=kubeconfig, stdin=yaml.safe_dump(body))
    assert proc.returncode != 0, f"accepted: {json.dumps(body['spec'])}"
    said = proc.stderr
    assert field in said or field.replace("spec.", ".spec.") in said, said
    items = custom.list_namespaced_custom_object(S.GROUP, S.VERSION, ns, S.PLURAL)["items"]
    assert not items


def test_missing_model_path_reports_degraded_with_an_event(
    namespaces: S.Namespaces, core, custom
) -> None:
    ns = namespaces.create("degraded")
    missing = f"pvc://{S.CLAIM}/no-such-model"
    body = S.isvc_body("chat", prefill=0, decode=1, model_uri=missing, pending=("router",))
    isvc = S.Isvc.create(custom, ns, body)

    def degraded() -> dict | None:
        cond = isvc.condition("Degraded")
        return cond if cond.get("status") == "True" else None

    cond = wait_until("Degraded=True", degraded, timeout=S.READY_TIMEOUT_S)
    assert cond["reason"] == "PodsFailing", cond
    assert "/models/llm-weights/no-such-model" in cond["message"], cond
    assert "decode" in cond["message"] and "CrashLoopBackOff" in cond["message"], cond
    assert isvc.condition("Ready")["status"] == "False"

    def warning() -> list:
        events = core.list_namespaced_event(
            ns, field_selector="involvedObject.name=chat,involvedObject.kind=InferenceService"
        ).items
        return [e for e in events if e.type == "Warning" and e.reason == "PodsFailing"]

    event = wait_until("a PodsFailing Warning Event", warning, timeout=60)[0]
    assert "/models/llm-weights/no-such-model" in event.message
