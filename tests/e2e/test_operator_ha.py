"""The operator as the chart runs it: two replicas, one Lease, readiness and metrics (item 5).

- Both replicas are Ready (the standby is ready to take over); exactly one holds the Lease and
  says so in its metrics, where its reconcile passes are counted; the standby counts none.
- The leader deleted as a rollout or a drain would (SIGTERM): it releases the Lease and the
  standby takes over at once and reconciles a change made meanwhile.
- The new leader's pod force-deleted, as a lost node looks (killed at once, no release): the
  other replica takes the Lease over once it has stood still for a whole lease duration, and
  reconciles again.
"""

from __future__ import annotations

import urllib.request

import e2e_support as S
import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster.controlplane.testing import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
SELECTOR = "app.kubernetes.io/name=splitserve-operator"
LEASE = "splitserve-operator"  # the chart's full name for this release


def _metrics(pod) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _pods(core, namespace: str) -> list:
    items = core.list_namespaced_pod(namespace, label_selector=SELECTOR).items
    return [p for p in items if p.metadata.deletion_timestamp is None]


def _holder(coordination, namespace: str) -> str | None:
    return coordination.read_namespaced_lease(LEASE, namespace).spec.holder_identity


def _reconciled(isvc: S.Isvc, generation: int) -> bool:
    status = isvc.get().get("status") or {}
    return status.get("observedGeneration") == generation


@pytest.fixture(scope="module")
def watched(namespaces: S.Namespaces, custom) -> S.Isvc:
    """An InferenceService whose engines never run (Pending): changes to it are cheap to make
    and to see reconciled (status.observedGeneration)."""
    ns = namespaces.create("ha", model_claim=False)
    body = S.isvc_body("ha", prefill=1, decode=1, pending=("prefill", "decode", "router"))
    return S.Isvc.create(custom, ns, body)


def test_two_replicas_one_leader_with_metrics(operator: str, core, api, watched) -> None:
    coordination = client.CoordinationV1Api(api)
    wait_until("the InferenceService reconciled", lambda: _reconciled(watched, 1), timeout=120)
    pods = _pods(core, operator)
    assert len(pods) == 2 and all(S.pod_ready(p) for p in pods)  # the standby is Ready too
    holder = wait_until("a Lease holder", lambda: _holder(coordination, operator), timeout=60)
    assert holder in {p.metadata.name for p in pods}
    by_name = {p.metadata.name: _metrics(p) for p in pods}
    leader, standby = by_name.pop(holder), next(iter(by_name.values()))
    assert leader["splitserve_operator_leader"] == 1 and standby["splitserve_operator_leader"] == 0
    assert leader["splitserve_operator_reconcile_total"] > 0
    assert leader["splitserve_operator_reconcile_duration_seconds_count"] > 0
    assert standby.get("splitserve_operator_reconcile_total", 0) == 0


def test_leader_gone_the_standby_takes_over_and_reconciles(
    operator: str, core, api, watched
) -> None:
    coordination = client.CoordinationV1Api(api)
    first = wait_until("a Lease holder", lambda: _holder(coordination, operator), timeout=60)
    transitions = coordination.read_namespaced_lease(LEASE, operator).spec.lease_transitions

    # 1. Deleted as a rollout or a drain deletes it: SIGTERM, the Lease released on the way out.
    core.delete_namespaced_pod(first, operator)
    second = wait_until(
        "the standby holds the Lease",
        lambda: (h := _holder(coordination, operator)) not in (None, first) and h,
        timeout=60,
    )
    generation = watched.patch({"spec": {"decode": {"replicas": 2}}})["metadata"]["generation"]
    wait_until(
        "the change reconciled by the new leader",
        lambda: _reconciled(watched, generation),
        timeout=120,
    )
    (pod,) = [p for p in _pods(core, operator) if p.metadata.name == second]
    assert _metrics(pod)["splitserve_operator_leader"] == 1
    lease = coordination.read_namespaced_lease(LEASE, operator).spec
    assert lease.lease_transitions > transitions

    # 2. The new leader's pod force-deleted: killed at once, no release; the other replica (the
    #    Deployment's replacement of the first) takes over after the lease duration.
    def both_ready() -> bool:
        pods = _pods(core, operator)
        return len(pods) == 2 and all(S.pod_ready(p) for p in pods)

    wait_until("both replicas Ready again", both_ready, timeout=240)
    core.delete_namespaced_pod(second, operator, grace_period_seconds=0)
    third = wait_until(
        "another replica holds the Lease",
        lambda: (h := _holder(coordination, operator)) not in (None, second) and h,
        timeout=120,
    )
    generation = watched.patch({"spec": {"decode": {"replicas": 1}}})["metadata"]["generation"]
    wait_until(
        "the change reconciled by the third leader",
        lambda: _reconciled(watched, generation),
        timeout=120,
    )
    assert third != second
