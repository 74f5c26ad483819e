"""The autoscaler's pure parts: spec parsing, metric parsing (from the servers' own metric
objects), latency windows, recommendations, windows and step limits, the prefill:decode
policy, scale to and from zero, deletion cost, and what reconcile renders from the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from splitserve.engine.async_engine import EngineHealth
from splitserve.engine.engine_core import EngineStats, KVAudit
from splitserve.operator import labels as L
from splitserve.operator.autoscale import decide
from splitserve.operator.autoscale.config import FIXED_RATIO, JointPolicy
from splitserve.operator.autoscale.controller import (
    AutoscalerState,
    Observation,
    managed_roles,
    starting_replicas,
    step,
    with_replicas,
)
from splitserve.operator.autoscale.cost import deletion_costs
from splitserve.operator.autoscale.metrics import (
    EngineSample,
    Histogram,
    RouterSample,
    parse_engine,
    parse_router,
)
from splitserve.operator.autoscale.signals import RoleSignals, RouterSignals, role_signals
from splitserve.operator.builders import build_desired
from splitserve.operator.spec import parse
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.router.metrics import RouterMetrics

ISO = "2026-01-01T00:00:00Z"


# ---- what the servers export -> samples -------------------------------------------------------


@dataclass
class Engine:
    """The slice of AsyncEngine that EngineMetrics reads when scraped."""

    running: int = 0
    waiting: int = 0
    usage: float = 0.0
    health_: EngineHealth = field(default_factory=lambda: EngineHealth(True))

    def stats(self) -> EngineStats:
        return EngineStats(self.running, self.waiting, self.usage, 100, 50, 0, 0, 0)

    def audit(self) -> KVAudit:
        return KVAudit(0, 0, 0)

    def health(self) -> EngineHealth:
        return self.health_


def engine_text(engine: Engine, ttft=(), itl=()) -> str:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, engine, "m", "decode", "e-1", 4096)
    for v in ttft:
        metrics.first_token(v)
    for v in itl:
        metrics.token_gap(v)
    return generate_latest(registry).decode()


def test_engine_metrics_parse_from_what_the_servers_export() -> None:
    text = engine_text(Engine(running=5, waiting=2, usage=0.4), ttft=[0.2] * 9 + [3.0])
    s = parse_engine("pod-a", text)
    assert (s.pod, s.running, s.waiting, s.kv_usage) == ("pod-a", 5, 2, 0.4)
    assert s.ttft is not None and s.ttft.count == 10
    assert s.itl is not None and s.itl.count == 0
    assert s.ttft.quantile(0.5) == pytest.approx(0.2, abs=0.05)


def test_router_metrics_parse_from_what_the_router_exports() -> None:
    m = RouterMetrics()
    m.cold_start_waiting.set(3)
    m.cold_start_requests.labels("served").inc(4)
    m.cold_start_requests.labels("timeout").inc()
    s = parse_router("r", generate_latest(m.registry).decode())
    assert (s.cold_start_waiting, s.cold_start_requests) == (3, 5)


def test_histogram_window_and_quantile() -> None:
    bounds = (0.1, 0.5, 1.0, float("inf"))
    old = Histogram(bounds, (10, 10, 10, 10))
    new = Histogram(bounds, (10, 10, 20, 20))  # 10 new observations in (0.5, 1]
    window = new.since(old)
    assert window.counts == (0, 0, 10, 10)
    assert window.quantile(0.9) == pytest.approx(0.95)
    assert Histogram(bounds, (0, 0, 0, 0)).quantile(0.9) is None
    # A restarted pod's counters went down: the new ones are the window.
    assert Histogram(bounds, (1, 1, 1, 1)).since(old).count == 1
    # Beyond the last finite bound, Prometheus answers that bound.
    assert Histogram(bounds, (0, 0, 0, 5)).quantile(0.5) == 1.0


def test_latency_comes_from_the_last_interval_only() -> None:
    bounds = (0.1, 1.0, float("inf"))
    before = {"a": EngineSample("a", itl=Histogram(bounds, (100, 100, 100)))}
    now = [
        EngineSample("a", running=4, itl=Histogram(bounds, (100, 110, 110))),
        # a pod seen for the first time: its lifetime histogram is not the last interval
        EngineSample("b", running=2, itl=Histogram(bounds, (0, 0, 50))),
    ]
    s = role_signals(now, before)
    assert (s.pods, s.running) == (2, 6)
    assert s.itl_p90 == pytest.approx(0.91)  # only pod a's 10 slow tokens count


# ---- spec -------------------------------------------------------------------------------------


def autoscaled(make_isvc, decode=None, prefill=None, joint=None, **spec):
    changes = dict(spec)
    if decode is not None:
        changes["decode"] = {"autoscaling": decode}
    if prefill is not None:
        changes["prefill"] = {"autoscaling": prefill}
    if joint is not None:
        changes["autoscaling"] = joint
    return parse(make_isvc(changes))


def test_autoscaling_spec_is_typed_with_defaults(make_isvc) -> None:
    isvc = autoscaled(make_isvc, decode={"maxReplicas": 4, "targets": {"concurrency": 8}})
    a = isvc.spec.decode.autoscaling
    assert a is not None and a.managed and (a.min_replicas, a.max_replicas) == (1, 4)
    assert a.targets.concurrency == 8 and a.targets.itl_seconds is None
    assert (a.scale_up.stabilization_seconds, a.scale_up.max_pods_per_step) == (0, 4)
    assert (a.scale_down.stabilization_seconds, a.scale_down.max_pods_per_step) == (300, 1)
    assert isvc.spec.prefill.autoscaling is None and isvc.spec.drain_seconds == 60
    assert managed_roles(isvc) == (L.DECODE,)
    assert not isvc.spec.scale_from_zero


def test_external_autoscaling_leaves_replicas_to_the_spec(make_isvc) -> None:
    isvc = autoscaled(make_isvc, decode={"external": True, "maxReplicas": 8})
    assert managed_roles(isvc) == ()
    (dep,) = [o for o in build_desired(isvc) if o["metadata"]["name"].startswith("chat-decode-")]
    assert dep["spec"]["replicas"] == 2  # spec.decode.replicas: what HPA / KEDA wrote
    # An operator pass with the autoscaler's memory changes nothing for an external role.
    assert with_replicas(isvc, {L.DECODE: 7}).spec.decode.replicas == 2


def test_prefill_scaled_to_zero_is_not_colocated(make_isvc) -> None:
    isvc = autoscaled(
        make_isvc,
        prefill={"minReplicas": 0, "maxReplicas": 2, "targets": {"queueDepth": 2}},
    )
    at_zero = with_replicas(isvc, {L.PREFILL: 0})
    assert at_zero.spec.prefill.replicas == 0 and not at_zero.spec.colocated
    assert at_zero.spec.scale_from_zero
    deployments = {
        o["metadata"]["labels"][L.ROLE_LABEL]: o
        for o in build_desired(at_zero)
        if o["kind"] == "Deployment"
    }
    assert deployments[L.PREFILL]["spec"]["replicas"] == 0
    decode_args = deployments[L.DECODE]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--colocated" not in decode_args
    router_args = deployments[L.ROUTER]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert router_args[router_args.index("--cold-start-timeout") + 1] == "300"


def test_the_operator_may_scrape_autoscaled_engines(make_isvc) -> None:
    def ingress(isvc):
        (policy,) = [o for o in build_desired(isvc) if o["kind"] == "NetworkPolicy"]
        return policy["spec"]["ingress"]

    plain = ingress(parse(make_isvc()))
    scaled = ingress(
        autoscaled(make_isvc, decode={"maxReplicas": 3, "targets": {"concurrency": 2}})
    )
    assert scaled[: len(plain)] == plain
    (extra,) = scaled[len(plain) :]
    assert extra["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert extra["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "splitserve-operator"
    }


def test_drain_seconds_render_prestop_and_grace(make_isvc, validate_k8s) -> None:
    isvc = parse(make_isvc({"drainSeconds": 120}))
    objects = build_desired(isvc)
    assert validate_k8s(objects) == []
    for dep in (o for o in objects if o["kind"] == "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 3}}}
        assert pod["terminationGracePeriodSeconds"] == 3 + 120 + 10
        assert c["args"][c["args"].index("--drain-seconds") + 1] == "120"
    no_drain = build_desired(parse(make_isvc({"drainSeconds": 0})))
    for dep in (o for o in no_drain if o["kind"] == "Deployment"):
        assert "lifecycle" not in dep["spec"]["template"]["spec"]["containers"][0]


# ---- decisions --------------------------------------------------------------------------------


def busy(pods: int, running: float = 0, waiting: float = 0, **kw) -> RoleSignals:
    return RoleSignals(pods=pods, running=running, waiting=waiting, **kw)


NO_QUEUE = RouterSignals()


def cfg_of(make_isvc, **autoscaling):
    body = {"maxReplicas": 8, "targets": {"concurrency": 4}} | autoscaling
    return autoscaled(make_isvc, decode=body).spec.decode.autoscaling


def test_each_target_asks_for_enough_pods(make_isvc) -> None:
    c = cfg_of(make_isvc, targets={"concurrency": 4})
    assert decide.recommend(c, 1, busy(1, running=13), NO_QUEUE).replicas == 4
    q = cfg_of(make_isvc, targets={"queueDepth": 2})
    assert decide.recommend(q, 2, busy(2, running=8, waiting=9), NO_QUEUE).replicas == 5
    kv = cfg_of(make_isvc, targets={"kvCacheUsage": 0.5})
    assert decide.recommend(kv, 2, busy(2, running=1, kv_usage=0.9), NO_QUEUE).replicas == 4
    itl = cfg_of(make_isvc, targets={"itlSeconds": 0.1})
    slow = busy(2, running=6, itl_p90=0.25)
    assert decide.recommend(itl, 2, slow, NO_QUEUE).replicas == 5
    # The most demanding target wins, and says so.
    both = cfg_of(make_isvc, targets={"concurrency": 4, "itlSeconds": 0.1})
    rec = decide.recommend(both, 2, slow, NO_QUEUE)
    assert rec.replicas == 5 and "itl p90 0.250s" in rec.why and "running 6" in rec.why
    # Within 10 % of the target nothing moves; bounds always hold.
    assert decide.recommend(c, 3, busy(3, running=12.9), NO_QUEUE).replicas == 3
    assert decide.recommend(c, 3, busy(3, running=400), NO_QUEUE).replicas == 8


def test_idle_missing_and_cold_start(make_isvc) -> None:
    c = cfg_of(make_isvc, minReplicas=0)
    assert decide.recommend(c, 3, busy(3), NO_QUEUE).replicas == 0  # idle
    assert decide.recommend(c, 3, RoleSignals(), NO_QUEUE).replicas == 3  # nobody answered
    assert decide.recommend(c, 0, RoleSignals(), NO_QUEUE).replicas == 0
    woken = decide.recommend(c, 0, RoleSignals(), RouterSignals(waiting=2))
    assert woken.replicas == 1 and "2 requests wait at the router" in woken.why
    # A busy pool never asks for zero, even below every target.
    assert decide.recommend(c, 2, busy(2, running=1), NO_QUEUE).replicas == 1


def test_fast_up_slow_down(make_isvc) -> None:
    c = cfg_of(make_isvc, scaleDown={"stabilizationSeconds": 60, "maxPodsPerStep": 1})
    up = decide.stabilize(c, 1, 100.0, [], decide.Recommendation(8, "load"), since=0.0)
    assert up.replicas == 5  # at once, at most 4 pods per step
    history = [(50.0, 4), (80.0, 3)]
    low = decide.Recommendation(1, "quiet")
    # A dip inside the window does not scale down below the window's highest need ...
    assert decide.stabilize(c, 4, 100.0, history, low, since=0.0).replicas == 4
    # ... once those needs are older than the window, one pod per step.
    assert decide.stabilize(c, 4, 141.0, history, low, since=0.0).replicas == 3
    # A fresh operator (no memory of the window) does not scale down yet.
    assert decide.stabilize(c, 4, 141.0, [], low, since=100.0).replicas == 4
    # A scale-up window: only a need that lasted the window scales up.
    slow_up = cfg_of(make_isvc, scaleUp={"stabilizationSeconds": 30})
    spike = decide.Recommendation(6, "spike")
    assert decide.stabilize(slow_up, 2, 100.0, [(80.0, 2)], spike, since=0.0).replicas == 2
    assert decide.stabilize(slow_up, 2, 100.0, [(80.0, 5)], spike, since=0.0).replicas == 5
    # Waking from zero ignores the windows: a request is waiting.
    wake = decide.Recommendation(1, "wake")
    assert decide.stabilize(slow_up, 0, 100.0, [(99.0, 0)], wake, since=0.0).replicas == 1


def test_prefill_decode_policies(make_isvc) -> None:
    pc = autoscaled(
        make_isvc, prefill={"minReplicas": 1, "maxReplicas": 6, "targets": {"queueDepth": 2}}
    ).spec.prefill.autoscaling
    fixed = JointPolicy(FIXED_RATIO, prefill_per_decode=0.5)
    assert decide.joint(fixed, pc, decide.Step(6, "own"), decode=5).replicas == 3
    assert "ceil(5 x 0.5) = 3" in decide.joint(fixed, pc, decide.Step(6, "own"), 5).why
    bounded = JointPolicy(min_prefill_per_decode=0.25, max_prefill_per_decode=1)
    assert decide.joint(bounded, pc, decide.Step(1, "own"), decode=8).replicas == 2
    assert decide.joint(bounded, pc, decide.Step(5, "own"), decode=2).replicas == 2
    assert decide.joint(JointPolicy(), pc, decide.Step(4, "own"), decode=1).replicas == 4
    zero_ok = autoscaled(
        make_isvc, prefill={"minReplicas": 0, "maxReplicas": 6, "targets": {"queueDepth": 2}}
    ).spec.prefill.autoscaling
    # Decode pods with no prefill pod cannot serve: at least one.
    assert decide.joint(JointPolicy(), zero_ok, decide.Step(0, "idle"), decode=1).replicas == 1
    assert decide.joint(JointPolicy(), zero_ok, decide.Step(0, "idle"), decode=0).replicas == 0


# ---- whole passes -----------------------------------------------------------------------------


def obs(decode=(), prefill=(), waiting_at_router=0.0, router_total=0.0) -> Observation:
    return Observation(
        engines={L.DECODE: list(decode), L.PREFILL: list(prefill)},
        routers=[RouterSample("r", waiting_at_router, router_total)],
    )


def test_a_load_ramp_scales_up_then_down_after_the_window(make_isvc) -> None:
    isvc = autoscaled(
        make_isvc,
        decode={"minReplicas": 1, "maxReplicas": 4, "targets": {"concurrency": 2},
                "scaleDown": {"stabilizationSeconds": 60}},
    )  # fmt: skip
    plan = step(isvc, None, obs([EngineSample("d0", running=7)]), 0.0, ISO, {})
    (d,) = plan.decisions
    assert (d.role, d.before, d.after, d.reason) == (L.DECODE, 2, 4, decide.SCALED_UP)
    assert "running 7.00/pod vs target 2" in d.message
    assert plan.status[L.DECODE]["replicas"] == 4
    assert plan.status[L.DECODE]["lastScaleTime"] == ISO
    state = plan.state
    quiet = [EngineSample(f"d{i}") for i in range(4)]
    for t in (10.0, 30.0, 59.0):  # inside the window: no change
        plan = step(isvc, state, obs(quiet), t, ISO, {"autoscaling": plan.status})
        assert not plan.decisions and plan.replicas[L.DECODE] == 4
        state = plan.state
    sizes = []
    for t in (70.0, 80.0, 90.0, 100.0):
        plan = step(isvc, state, obs(quiet), t, ISO, {"autoscaling": plan.status})
        state = plan.state
        sizes.append(plan.replicas[L.DECODE])
        if plan.decisions:
            assert plan.decisions[0].reason == decide.SCALED_DOWN
            # the least-loaded pod is marked to go first
            assert set(plan.deletion_costs[L.DECODE]) == {"d0", "d1", "d2", "d3"}
    assert sizes == [3, 2, 1, 1]


def test_scale_to_zero_and_back_in_both_roles(make_isvc) -> None:
    isvc = autoscaled(
        make_isvc,
        decode={"minReplicas": 0, "maxReplicas": 3, "targets": {"concurrency": 4},
                "scaleDown": {"stabilizationSeconds": 0, "maxPodsPerStep": 4}},
        prefill={"minReplicas": 0, "maxReplicas": 2, "targets": {"queueDepth": 4},
                 "scaleDown": {"stabilizationSeconds": 0, "maxPodsPerStep": 4}},
    )  # fmt: skip
    idle = obs([EngineSample("d0"), EngineSample("d1")], [EngineSample("p0")])
    plan = step(isvc, None, idle, 0.0, ISO, {})
    assert plan.replicas == {L.PREFILL: 0, L.DECODE: 0}
    assert {d.reason for d in plan.decisions} == {decide.SCALED_TO_ZERO}
    # Nothing runs; a request arrives at the router and waits.
    plan = step(isvc, plan.state, obs(waiting_at_router=1, router_total=1), 5.0, ISO, {})
    assert plan.replicas == {L.PREFILL: 1, L.DECODE: 1}
    assert {d.reason for d in plan.decisions} == {decide.SCALED_FROM_ZERO}
    assert any("wait at the router" in d.message for d in plan.decisions)


def test_fixed_ratio_follows_an_external_decode_size(make_isvc) -> None:
    isvc = parse(make_isvc({
        # replicas: what HPA wrote through the scale subresource
        "decode": {"replicas": 5, "autoscaling": {"external": True, "maxReplicas": 8}},
        "prefill": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
        "autoscaling": {"policy": "FixedRatio", "prefillPerDecode": 0.5},
    }))  # fmt: skip
    assert managed_roles(isvc) == (L.PREFILL,)
    plan = step(isvc, None, obs(), 0.0, ISO, {})
    assert plan.replicas == {L.PREFILL: 3}
    assert "follows decode: ceil(5 x 0.5) = 3" in plan.decisions[0].message


def test_reconcile_renders_the_recorded_sizes(make_isvc) -> None:
    isvc = autoscaled(make_isvc, decode={"maxReplicas": 6, "targets": {"concurrency": 2}})
    assert starting_replicas(isvc, {}) == {L.DECODE: 2}
    recorded = {"autoscaling": {L.DECODE: {"replicas": 5}}}
    assert starting_replicas(isvc, recorded) == {L.DECODE: 5}
    # Bounds edited below the recorded size: the new bound holds at once.
    tight = autoscaled(make_isvc, decode={"maxReplicas": 3, "targets": {"concurrency": 2}})
    assert with_replicas(tight, starting_replicas(tight, recorded)).spec.decode.replicas == 3


def test_deletion_cost_orders_pods_by_load() -> None:
    costs = deletion_costs([
        EngineSample("busy", running=3, kv_usage=0.5),
        EngineSample("idle", kv_usage=0.9),
        EngineSample("empty"),
    ])  # fmt: skip
    assert sorted(costs, key=lambda p: int(costs[p])) == ["empty", "idle", "busy"]


def test_state_keeps_only_the_windows(make_isvc) -> None:
    isvc = autoscaled(
        make_isvc,
        decode={"maxReplicas": 4, "targets": {"concurrency": 2},
                "scaleDown": {"stabilizationSeconds": 30}},
    )  # fmt: skip
    state: AutoscalerState | None = None
    for t in range(0, 300, 10):
        state = step(isvc, state, obs([EngineSample("d0", running=2)]), float(t), ISO, {}).state
    assert state is not None and len(state.roles[L.DECODE].history) <= 4
