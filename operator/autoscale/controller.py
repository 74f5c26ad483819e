"""One autoscaling pass as a pure function: (spec, memory, observation, time) -> plan.

The memory (``AutoscalerState``) is what a pass needs from earlier ones: the recommendations
inside the stabilization windows, each pod's last sample (latency is read over the interval
between two scrapes), the routers' cold-start counter, and the sizes last set. The operator
keeps it in memory per InferenceService; the sizes also go to ``status.autoscaling``, so a
restarted operator starts from them (and, having no windows yet, scales down only after one
whole scale-down window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.autoscale import decide
from splitserve.operator.autoscale.config import RoleAutoscaling
from splitserve.operator.autoscale.cost import deletion_costs
from splitserve.operator.autoscale.metrics import EngineSample, RouterSample
from splitserve.operator.autoscale.signals import role_signals, router_signals
from splitserve.operator.spec import InferenceService

ROLES = (L.PREFILL, L.DECODE)


@dataclass(frozen=True)
class RoleMemory:
    history: tuple[tuple[float, int], ...] = ()  # (time, recommended) inside the windows
    samples: Mapping[str, EngineSample] = field(default_factory=dict)  # last, by pod
    replicas: int | None = None  # the size last set


@dataclass(frozen=True)
class AutoscalerState:
    since: float  # when this memory started (windows before it are unknown)
    roles: Mapping[str, RoleMemory] = field(default_factory=dict)
    router_requests: float | None = None  # the routers' cold-start counter, last pass

    @property
    def replicas(self) -> dict[str, int]:
        return {r: m.replicas for r, m in self.roles.items() if m.replicas is not None}


@dataclass(frozen=True)
class Observation:
    """What the pods reported this pass (pods that did not answer are absent)."""

    engines: Mapping[str, Sequence[EngineSample]] = field(default_factory=dict)  # by role
    routers: Sequence[RouterSample] = ()


@dataclass(frozen=True)
class Decision:
    """A change of one role's size, with the reason and the numbers behind it."""

    role: str
    before: int
    after: int
    recommended: int
    reason: str  # decide.SCALED_UP, ...
    message: str


@dataclass(frozen=True)
class Plan:
    replicas: Mapping[str, int]  # every managed role's size from now on
    decisions: tuple[Decision, ...]
    status: dict[str, Any]  # status.autoscaling
    deletion_costs: Mapping[str, Mapping[str, str]]  # role going down -> pod -> cost
    state: AutoscalerState


def role_config(isvc: InferenceService, role: str) -> RoleAutoscaling | None:
    pool = isvc.spec.prefill if role == L.PREFILL else isvc.spec.decode
    return pool.autoscaling


def managed_roles(isvc: InferenceService) -> tuple[str, ...]:
    """Roles whose size the operator decides (autoscaling set, not external; prefill only
    when the service is disaggregated)."""
    out = []
    for role in ROLES:
        cfg = role_config(isvc, role)
        if cfg is not None and cfg.managed and not (role == L.PREFILL and isvc.spec.colocated):
            out.append(role)
    return tuple(out)


def starting_replicas(isvc: InferenceService, status: Mapping[str, Any]) -> dict[str, int]:
    """Managed roles' sizes with no memory: the last ones in status, else the spec's replicas
    within the bounds."""
    recorded = (status or {}).get("autoscaling") or {}
    out = {}
    for role in managed_roles(isvc):
        cfg = role_config(isvc, role)
        assert cfg is not None
        last = (recorded.get(role) or {}).get("replicas")
        spec_replicas = (isvc.spec.prefill if role == L.PREFILL else isvc.spec.decode).replicas
        out[role] = cfg.clamp(int(last) if last is not None else spec_replicas)
    return out


def with_replicas(isvc: InferenceService, replicas: Mapping[str, int]) -> InferenceService:
    """``isvc`` with the managed roles' pools at the given sizes (what the builders render),
    within the spec's current bounds (they may have just been edited)."""
    spec = isvc.spec
    for role in managed_roles(isvc):
        cfg = role_config(isvc, role)
        if role in replicas and cfg is not None:
            pool = spec.prefill if role == L.PREFILL else spec.decode
            pool = dataclasses.replace(pool, replicas=cfg.clamp(int(replicas[role])))
            spec = dataclasses.replace(spec, **{role: pool})
    return dataclasses.replace(isvc, spec=spec)


def step(
    isvc: InferenceService,
    state: AutoscalerState | None,
    obs: Observation,
    now: float,
    now_iso: str,
    status: Mapping[str, Any],
) -> Plan:
    """Decide every managed role's size for this pass (see decide.py for each rule)."""
    roles = managed_roles(isvc)
    state = state or AutoscalerState(since=now)
    start = starting_replicas(isvc, status)
    current = {r: _current(state, r, start) for r in roles}
    router = router_signals(obs.routers, state.router_requests)
    recs: dict[str, decide.Recommendation] = {}
    steps: dict[str, decide.Step] = {}
    memories: dict[str, RoleMemory] = {}
    for role in roles:
        cfg = role_config(isvc, role)
        assert cfg is not None
        memory = state.roles.get(role, RoleMemory())
        samples = list(obs.engines.get(role, ()))
        signals = role_signals(samples, memory.samples)
        rec = decide.recommend(cfg, current[role], signals, router)
        recs[role] = rec
        stepped = decide.stabilize(cfg, current[role], now, memory.history, rec, state.since)
        if cfg.clamp(stepped.replicas) != stepped.replicas:  # the bounds were just edited
            stepped = decide.Step(cfg.clamp(stepped.replicas), f"{stepped.why}; new bounds")
        steps[role] = stepped
        keep = max(cfg.scale_up.stabilization_seconds, cfg.scale_down.stabilization_seconds)
        history = tuple((t, n) for t, n in memory.history if now - t <= keep)
        memories[role] = RoleMemory(
            history=(*history, (now, rec.replicas)), samples={s.pod: s for s in samples}
        )
    decode_size = steps[L.DECODE].replicas if L.DECODE in steps else isvc.spec.decode.replicas
    if L.PREFILL in steps:
        steps[L.PREFILL] = decide.joint(
            isvc.spec.autoscaling, role_config(isvc, L.PREFILL), steps[L.PREFILL], decode_size
        )
    decisions, costs, out_status = [], {}, {}
    previous = (status or {}).get("autoscaling") or {}
    for role in roles:
        before, after = current[role], steps[role].replicas
        entry = dict(previous.get(role) or {})
        entry["replicas"] = after
        if after != before:
            message = f"{role} {before} -> {after}: {steps[role].why}"
            reason = decide.reason(before, after)
            decisions.append(Decision(role, before, after, recs[role].replicas, reason, message))
            entry |= {
                "recommended": recs[role].replicas,
                "lastScaleTime": now_iso,
                "reason": reason,
                "message": message,
            }
            if after < before:
                costs[role] = deletion_costs(obs.engines.get(role, ()))
        out_status[role] = entry
        memories[role] = dataclasses.replace(memories[role], replicas=after)
    total = sum(s.cold_start_requests for s in obs.routers) if obs.routers else None
    new_state = AutoscalerState(
        since=state.since,
        roles=memories,
        router_requests=total if total is not None else state.router_requests,
    )
    return Plan(
        replicas={r: steps[r].replicas for r in roles},
        decisions=tuple(decisions),
        status=out_status,
        deletion_costs=costs,
        state=new_state,
    )


def _current(state: AutoscalerState, role: str, start: Mapping[str, int]) -> int:
    memory = state.roles.get(role)
    if memory is not None and memory.replicas is not None:
        return memory.replicas
    return start[role]
