"""One autoscaling pass against the cluster: read the pods, decide, mark the pods to remove
first, then reconcile with the new sizes (which writes status and posts the Events).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.adapters import AdapterProbe
from splitserve.operator.autoscale.controller import AutoscalerState, managed_roles, step
from splitserve.operator.autoscale.cost import DELETION_COST_ANNOTATION
from splitserve.operator.autoscale.scrape import MetricsReader
from splitserve.operator.kube import PODS, ApiError, KubeApi
from splitserve.operator.reconcile import Event, ReconcileResult, reconcile
from splitserve.operator.spec import SpecError, parse

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """``result`` is None when nothing changed (no status to write); ``state`` is the memory
    for the next pass (None: this resource is not autoscaled)."""

    result: ReconcileResult | None
    state: AutoscalerState | None


async def autoscale_pass(
    api: KubeApi,
    reader: MetricsReader,
    body: Mapping[str, Any],
    state: AutoscalerState | None,
    now: float,
    now_iso: str,
    probe: AdapterProbe | None = None,
) -> PassResult:
    """Decide the autoscaled roles' sizes and, when they change, apply them (a reconcile pass,
    with ``probe`` for the adapters' status as every pass has)."""
    try:
        isvc = parse(body)
    except SpecError:
        return PassResult(None, state)  # the reconcile pass reports it; keep the memory
    if not managed_roles(isvc):
        return PassResult(None, None)
    selector = f"{L.INSTANCE_LABEL}={isvc.name},{L.MANAGED_BY_LABEL}={L.MANAGED_BY}"
    try:
        pods = await api.list(PODS, isvc.namespace, selector)
    except ApiError as err:
        log.warning("%s/%s: autoscaling skipped, pods unreadable: %s",
                    isvc.namespace, isvc.name, err)  # fmt: skip
        return PassResult(None, state)
    observation = await reader.observe(pods)
    status = dict(body.get("status") or {})
    plan = step(isvc, state, observation, now, now_iso, status)
    for decision in plan.decisions:
        log.info("%s/%s: %s", isvc.namespace, isvc.name, decision.message)
    # Before the Deployment shrinks: the ReplicaSet removes the lowest-cost pod first.
    for costs in plan.deletion_costs.values():
        for pod, cost in costs.items():
            try:
                await api.annotate(PODS, isvc.namespace, pod, {DELETION_COST_ANNOTATION: cost})
            except ApiError as err:  # it only orders the removal: scale down anyway
                log.warning("pod-deletion-cost on %s: %s", pod, err)
    if not plan.decisions and plan.status == (status.get("autoscaling") or {}):
        return PassResult(None, plan.state)
    result = await reconcile(
        api, body, now_iso, probe, scale=plan.replicas, autoscaling=plan.status
    )
    events = tuple(Event("Normal", d.reason, d.message) for d in plan.decisions)
    return PassResult(dataclasses.replace(result, events=result.events + events), plan.state)
