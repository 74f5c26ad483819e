"""One level-based reconcile pass: parse, build, apply, prune, read back, compute status.

The pass never looks at what changed, only at what is: it builds every desired object from the
current spec, applies those that differ from the cluster, deletes owned objects no longer
desired, and derives status from the children. Run on create, update, resume and on a timer, it
also undoes drift (a deleted child, a hand-scaled Deployment).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.adapters import (
    ADAPTERS_LOADED,
    AdapterProbe,
    adapters_status,
    probe_loaded,
)
from splitserve.operator.autoscale.controller import (
    managed_roles,
    starting_replicas,
    with_replicas,
)
from splitserve.operator.builders import build_desired, engine_roles
from splitserve.operator.kube import CHILD_KINDS, PODS, ApiError, KubeApi
from splitserve.operator.spec import SpecError, parse, short_hash
from splitserve.operator.status import (
    compute_status,
    condition,
    failing_reason,
    invalid_spec_status,
    pod_problems,
    pods_pending,
    role_state,
)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the InferenceService."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass did; the kopf handler turns it into a status patch, Events and retries."""

    status: dict[str, Any]
    events: tuple[Event, ...] = ()
    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    retained: tuple[str, ...] = ()  # no longer desired, serving until the new ones are ready
    retry: str = ""  # "" | "temporary" (retry soon) | "permanent" (wait for a spec change)
    error: str = ""


@dataclass
class _Plan:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)  # not desired, kept until rolled out
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)


def contains(desired: Any, actual: Any) -> bool:
    """True when every field set in ``desired`` has the same value in ``actual``.

    Fields the API server adds (defaults, status, metadata) are ignored; lists must match item by
    item. Quantities compare as text, so ``1`` and ``"1"`` agree.
    """
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(v, actual[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(contains(d, a) for d, a in zip(desired, actual, strict=True))
        )
    if isinstance(desired, bool) or isinstance(actual, bool):
        return desired == actual
    return desired == actual or str(desired) == str(actual)


def stamp(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` annotated with the hash of what we apply.

    `contains` alone cannot see a field we stopped setting (a removed nodeSelector is still in
    the cluster, so desired is still a subset); a changed hash triggers the apply, and server-side
    apply then drops the fields we no longer own.
    """
    out = copy.deepcopy(obj)
    annotations = out["metadata"].setdefault("annotations", {})
    annotations[L.APPLIED_HASH_ANNOTATION] = short_hash(obj)
    return out


def _ref(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def owned_by(obj: Mapping[str, Any], name: str, uid: str) -> bool:
    """A child of this InferenceService: our labels and an owner reference to its uid.

    Pruning and deletion act only on such objects, so a look-alike someone else made (same
    labels, no owner reference) is never touched.
    """
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(L.INSTANCE_LABEL) != name or labels.get(L.MANAGED_BY_LABEL) != L.MANAGED_BY:
        return False
    return any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or [])


async def list_children(api: KubeApi, namespace: str, name: str, uid: str) -> list[dict[str, Any]]:
    """Every owned child, all kinds. Filters client-side too: selectors are not always honoured."""
    selector = f"{L.INSTANCE_LABEL}={name},{L.MANAGED_BY_LABEL}={L.MANAGED_BY}"
    children: list[dict[str, Any]] = []
    for info in CHILD_KINDS.values():
        for obj in await api.list(info, namespace, selector):
            if (obj.get("metadata") or {}).get("namespace", namespace) == namespace and owned_by(
                obj, name, uid
            ):
                children.append(obj)
    return children


async def _apply_all(
    api: KubeApi, desired: list[dict[str, Any]], existing: list[dict[str, Any]]
) -> _Plan:
    plan = _Plan()
    current = {_ref(obj): obj for obj in existing}
    for obj in map(stamp, desired):
        ref = _ref(obj)
        before = current.get(ref)
        if before is not None and contains(obj, before):
            stored = before
        else:
            stored = await api.apply(obj)
            (plan.created if before is None else plan.updated).append(ref)
        if obj["kind"] == "Deployment":
            plan.deployments[obj["metadata"]["labels"][L.ROLE_LABEL]] = stored
    wanted = {_ref(obj) for obj in desired}
    stale = [(ref, obj) for ref, obj in current.items() if ref not in wanted]
    # Objects no longer desired (a previous generation's engine Deployments, a prefill pool
    # being removed) serve until every desired Deployment is rolled out: prefill and decode
    # pods pair only within a generation, so the old one must keep both of its roles until
    # the new one can take the traffic. Then they go, in the same pass.
    if stale and not _rolled_out(plan.deployments):
        plan.retained = [ref for ref, _ in stale]
        return plan
    for ref, obj in stale:
        meta = obj["metadata"]
        await api.delete(CHILD_KINDS[obj["kind"]], meta["namespace"], meta["name"])
        plan.pruned.append(ref)
    return plan


def _rolled_out(deployments: Mapping[str, Mapping[str, Any]]) -> bool:
    """Every desired Deployment, as just stored, runs its template on all replicas, ready."""
    return all(
        role_state(role, int(dep.get("spec", {}).get("replicas") or 0), dep).rolled_out
        for role, dep in deployments.items()
    )


def _warning_once(previous: Mapping[str, Any], reason: str, message: str) -> tuple[Event, ...]:
    """A Warning Event unless the last status already reported this very problem."""
    for cond in previous.get("conditions") or []:
        if cond.get("type") == "Degraded" and (cond.get("reason"), cond.get("message")) == (
            reason,
            message,
        ):
            return ()
    return (Event("Warning", reason, message),)


def _rollout_events(previous: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    events = []
    old_target = previous.get("desiredRolloutHash")
    if old_target and old_target != status["desiredRolloutHash"]:
        events.append(
            Event(
                "Normal",
                "RolloutStarted",
                f"rolling prefill and decode to rollout hash "
                f"{status['desiredRolloutHash']} (from {old_target})",
            )
        )
    served = status.get("rolloutHash")
    if served and served != previous.get("rolloutHash"):
        events.append(Event("Normal", "RolloutComplete", f"all pods serve rollout hash {served}"))
    return events


async def reconcile(
    api: KubeApi,
    body: Mapping[str, Any],
    now: str,
    probe: AdapterProbe | None = None,
    *,
    scale: Mapping[str, int] | None = None,
    autoscaling: Mapping[str, Any] | None = None,
) -> ReconcileResult:
    """Make the cluster match one InferenceService ``body``; never raises for API errors.

    ``probe`` asks engine pods which LoRA adapters they have loaded (status only). Autoscaled
    roles (``autoscale/``) get their size from ``scale`` (the autoscaler's, when it has
    decided), else from ``status.autoscaling``; ``autoscaling`` is the autoscaler's new
    ``status.autoscaling`` (kept from the last status when not given).
    """
    meta = body.get("metadata") or {}
    previous = dict(body.get("status") or {})
    generation = int(meta.get("generation") or 1)
    try:
        isvc = parse(body)
        sizes = starting_replicas(isvc, previous) | dict(scale or {})
        isvc = with_replicas(isvc, sizes)
        desired = build_desired(isvc)  # everything is built before anything is applied
    except SpecError as exc:
        message = str(exc)
        return ReconcileResult(
            status=invalid_spec_status(generation, message, previous, now),
            events=_warning_once(previous, "InvalidSpec", message),
            retry="permanent",
            error=message,
        )
    existing: list[dict[str, Any]] = []
    try:
        existing = await list_children(api, isvc.namespace, isvc.name, isvc.uid)
        plan = await _apply_all(api, desired, existing)
    except ApiError as exc:
        message = f"applying children failed: {exc}"
        deployments = {
            obj["metadata"]["labels"][L.ROLE_LABEL]: obj
            for obj in existing
            if obj["kind"] == "Deployment" and L.ROLE_LABEL in obj["metadata"].get("labels", {})
        }
        status = compute_status(isvc, deployments, previous, now, ("ApplyFailed", message))
        return ReconcileResult(
            status=status,
            events=_warning_once(previous, "ApplyFailed", message),
            retry="temporary" if exc.transient else "permanent",
            error=message,
        )
    pods: list[dict[str, Any]] = []
    try:
        selector = f"{L.INSTANCE_LABEL}={isvc.name},{L.MANAGED_BY_LABEL}={L.MANAGED_BY}"
        pods = await api.list(PODS, isvc.namespace, selector)
    except ApiError:
        pass  # status from the Deployments alone; the next pass reads pods again
    failing, pending = pod_problems(pods), pods_pending(pods)
    status = compute_status(
        isvc,
        plan.deployments,
        previous,
        now,
        failing=failing,
        retained=plan.retained,
        pending=pending,
    )
    if managed_roles(isvc):
        status["autoscaling"] = dict(autoscaling or previous.get("autoscaling") or {})
    elif previous.get("autoscaling"):
        status["autoscaling"] = None  # autoscaling was turned off: the merge patch deletes it
    events: list[Event] = []
    if isvc.spec.lora_enabled and probe is not None:
        loaded = await probe_loaded(probe, pods, engine_roles(isvc))
        fields, (ok, reason, message) = adapters_status(isvc, loaded)
        status.update(fields)
        before = {c.get("type"): c for c in previous.get("conditions") or []}.get(ADAPTERS_LOADED)
        status["conditions"].append(
            condition(ADAPTERS_LOADED, ok, reason, message, isvc.generation, now,
                      previous.get("conditions") or [])
        )  # fmt: skip
        if ok and reason == "AllLoaded" and (before or {}).get("message") != message:
            events.append(Event("Normal", ADAPTERS_LOADED, message))
    if failing:
        events += _warning_once(previous, failing_reason(failing), "; ".join(failing))
    if plan.created or plan.updated or plan.pruned:
        parts = [
            f"{verb} {', '.join(refs)}"
            for verb, refs in (
                ("created", plan.created),
                ("updated", plan.updated),
                ("pruned", plan.pruned),
            )
            if refs
        ]
        events.append(Event("Normal", "Applied", "; ".join(parts)))
    events += _rollout_events(previous, status)
    return ReconcileResult(
        status=status,
        events=tuple(events),
        created=tuple(plan.created),
        updated=tuple(plan.updated),
        pruned=tuple(plan.pruned),
        retained=tuple(plan.retained),
    )


async def delete_children(api: KubeApi, namespace: str, name: str, uid: str) -> list[str]:
    """Delete every owned child (garbage collection does it too; this makes it prompt)."""
    deleted = []
    for obj in await list_children(api, namespace, name, uid):
        if await api.delete(CHILD_KINDS[obj["kind"]], namespace, obj["metadata"]["name"]):
            deleted.append(_ref(obj))
    return deleted
