"""Pure status computation: child Deployment statuses -> InferenceService status.

Conditions follow the Kubernetes convention (type, status, reason, message,
observedGeneration, lastTransitionTime, which changes only when status flips), so GitOps
health checks (Argo CD, Flux kstatus) can read them:

- Ready: every role has all its replicas updated to the desired configuration and ready.
- Progressing: a rollout is under way (some role has old pods, or not enough new ones).
- Degraded: the spec is invalid, applying failed, a rollout is stuck, or pods keep failing
  (crash loops, configuration errors: `pod_problems`), with the failing container's last words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.builders import endpoint_url, engine_roles
from splitserve.operator.builders.model import DOWNLOAD_CONTAINER
from splitserve.operator.spec import InferenceService

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
PODS_FAILING = "PodsFailing"
MODEL_DOWNLOAD_FAILED = "ModelDownloadFailed"
# Waiting reasons that mean a container will not come up by itself (kubelet's names).
FAILING_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "RunContainerError",
    }
)
MESSAGE_CHARS = 300
ROLES = (L.PREFILL, L.DECODE, L.ROUTER)


@dataclass(frozen=True)
class RoleState:
    """One role's rollout as its Deployment reports it."""

    role: str
    desired: int
    ready: int = 0
    updated: int = 0
    total: int = 0
    current: bool = False  # the Deployment controller has seen the latest template
    stuck: str = ""  # why the controller gave up (ProgressDeadlineExceeded, ReplicaFailure)

    @property
    def rolled_out(self) -> bool:
        """All pods run the desired template, are ready, and no old pod is left."""
        return (
            self.current
            and self.updated >= self.desired
            and self.ready >= self.desired
            and self.total <= self.desired
        )

    def as_status(self) -> dict[str, Any]:
        return {
            "replicas": self.desired,
            "readyReplicas": self.ready,
            "updatedReplicas": self.updated,
            "summary": f"{self.ready}/{self.desired}",
        }


def role_state(role: str, desired: int, deployment: Mapping[str, Any] | None) -> RoleState:
    """Read a Deployment's status; a missing Deployment has nothing ready or updated."""
    if deployment is None:
        return RoleState(role, desired, current=desired == 0)
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    # Without a generation (emulators) the status is taken as current.
    current = generation is None or (observed is not None and observed >= generation)
    stuck = ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            stuck = f"{cond.get('reason')}: {cond.get('message', '')}".strip()
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            stuck = f"{cond.get('reason')}: {cond.get('message', '')}".strip()
    return RoleState(
        role=role,
        desired=desired,
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        total=int(status.get("replicas") or 0),
        current=current,
        stuck=stuck,
    )


def _last_words(text: str) -> str:
    """The last non-empty line of a termination message (a traceback's error line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= MESSAGE_CHARS else last[: MESSAGE_CHARS - 3] + "..."


def pod_problems(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per container (init containers included) that will not come up by itself,
    sorted (stable across passes: no restart counts or back-off delays, so an unchanged problem
    is not reported anew).

    The engines', router's and download step's containers use terminationMessagePolicy
    FallbackToLogsOnError, so the last exit carries the tail of the output: the line that says
    why (a model path that does not exist, a gated model without a token).
    """
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        role = (meta.get("labels") or {}).get(L.ROLE_LABEL, "?")
        status = pod.get("status") or {}
        containers = (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        )
        for c in containers:
            waiting = (c.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason", "")
            if reason not in FAILING_WAITING_REASONS:
                continue
            line = f"pod {meta.get('name')} ({role}) container {c.get('name')}: {reason}"
            last = (c.get("lastState") or {}).get("terminated") or {}
            if last:
                line += f", exit code {last.get('exitCode')}"
                words = _last_words(str(last.get("message") or ""))
                if words:
                    line += f": {words}"
            elif reason != "CrashLoopBackOff" and waiting.get("message"):
                line += f": {_last_words(str(waiting['message']))}"
            out.append(line)
    return sorted(out)


def failing_reason(failing: Sequence[str]) -> str:
    """The Degraded reason for these lines: a failed model download is named as such."""
    if any(f" container {DOWNLOAD_CONTAINER}: " in line for line in failing):
        return MODEL_DOWNLOAD_FAILED
    return PODS_FAILING


def pods_pending(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why pods wait to be scheduled (e.g. no node with a free GPU), one line per pod, sorted.

    Not a failure (an autoscaler may add the node), but what a user asks first when Ready
    stays False: it goes into the Ready condition's message.
    """
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                role = (meta.get("labels") or {}).get(L.ROLE_LABEL, "?")
                words = _last_words(str(cond.get("message") or ""))
                out.append(f"pod {meta.get('name')} ({role}) unschedulable: {words}")
    return sorted(out)


def condition(
    kind: str,
    value: bool,
    reason: str,
    message: str,
    generation: int,
    now: str,
    previous: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    status = "True" if value else "False"
    since = now
    for cond in previous:
        if cond.get("type") == kind and cond.get("status") == status:
            since = cond.get("lastTransitionTime") or now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def compute_status(
    isvc: InferenceService,
    deployments: Mapping[str, Mapping[str, Any] | None],
    previous: Mapping[str, Any],
    now: str,
    problem: tuple[str, str] | None = None,
    failing: Sequence[str] = (),
    retained: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole status from the role Deployments (by role) and the last status.

    ``problem`` is (reason, message) when this pass could not apply the desired objects;
    ``failing`` lists the pods that will not come up (``pod_problems``); ``retained`` the
    objects of the previous generation still serving until this one is rolled out;
    ``pending`` the pods no node can take yet (``pods_pending``).
    The served model, revision and rollout hash move to the desired ones only when the
    rollout completes, so status never claims a version that is not fully serving.
    """
    s = isvc.spec
    desired = {L.PREFILL: s.prefill.replicas, L.DECODE: s.decode.replicas}
    desired[L.ROUTER] = s.router.pool.replicas
    if s.colocated:
        desired[L.PREFILL] = 0
    active = (*engine_roles(isvc), L.ROUTER)
    states = {
        role: role_state(role, desired[role], deployments.get(role) if role in active else None)
        for role in ROLES
    }
    rolled_out = all(states[r].rolled_out for r in active)
    progress = ", ".join(f"{r} {states[r].updated}/{states[r].desired} updated" for r in active)
    ready_text = ", ".join(f"{r} {states[r].ready}/{states[r].desired} ready" for r in active)
    stuck = "; ".join(f"{r}: {states[r].stuck}" for r in active if states[r].stuck)
    unavailable = [r for r in active if states[r].ready < states[r].desired]
    gen, prev = isvc.generation, previous.get("conditions") or []

    if problem is not None:
        ready = condition(READY, False, problem[0], problem[1], gen, now, prev)
    elif rolled_out:
        ready = condition(READY, True, "AllReplicasReady", ready_text, gen, now, prev)
    else:
        rolling = any(
            not st.current or st.updated < st.desired or st.total > st.desired
            for st in (states[r] for r in active)
        )
        reason = "RollingOut" if rolling else "ReplicasNotReady"
        message = f"{progress}; {ready_text}"
        if pending:
            message += "; " + "; ".join(pending)
        ready = condition(READY, False, reason, message, gen, now, prev)
    if rolled_out:
        progressing = condition(PROGRESSING, False, "RolloutComplete", progress, gen, now, prev)
    else:
        message = progress
        if retained:
            message += "; the previous generation serves until then: " + ", ".join(retained)
        progressing = condition(PROGRESSING, True, "RollingOut", message, gen, now, prev)
    if problem is not None:
        degraded = condition(DEGRADED, True, problem[0], problem[1], gen, now, prev)
    elif stuck:
        degraded = condition(DEGRADED, True, "RolloutStuck", stuck, gen, now, prev)
    elif failing:
        message = "; ".join(failing)
        degraded = condition(DEGRADED, True, failing_reason(failing), message, gen, now, prev)
    elif rolled_out or not unavailable:
        degraded = condition(DEGRADED, False, "AsExpected", ready_text, gen, now, prev)
    else:
        degraded = condition(DEGRADED, False, "RollingOut", ready_text, gen, now, prev)

    status: dict[str, Any] = {
        "observedGeneration": gen,
        "url": endpoint_url(isvc),
        "desiredRolloutHash": s.rollout_hash,
        "model": previous.get("model", ""),
        "revision": previous.get("revision", ""),
        "rolloutHash": previous.get("rolloutHash", ""),
        "conditions": [ready, progressing, degraded],
    }
    if rolled_out and problem is None:
        status["model"] = s.model.uri
        status["revision"] = s.model.revision
        status["rolloutHash"] = s.rollout_hash
    for role in ROLES:
        # The selector is the scale subresource's labelSelectorPath (HPA averages its pods).
        selector = L.selector_string(L.selector_labels(isvc, role))
        status[role] = states[role].as_status() | {"selector": selector}
    return status


def invalid_spec_status(
    generation: int, message: str, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Status for a spec the operator refuses: nothing was applied, the old pods keep serving."""
    prev = previous.get("conditions") or []
    return dict(previous) | {
        "observedGeneration": generation,
        "conditions": [
            condition(READY, False, "InvalidSpec", message, generation, now, prev),
            condition(PROGRESSING, False, "InvalidSpec", message, generation, now, prev),
            condition(DEGRADED, True, "InvalidSpec", message, generation, now, prev),
        ],
    }
