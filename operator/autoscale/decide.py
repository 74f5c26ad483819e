"""Pure autoscaling decisions: signals -> a recommendation -> a stabilized, bounded size, and the
prefill:decode policy on top. No I/O, no clock: time comes in as an argument.

1. ``recommend``: what the signals alone ask for. For each target set, additive signals
   (waiting and running requests, KV use) ask ``ceil(total / target)`` pods; latency signals
   ask ``ceil(current x p90 / target)``. Within 10 % of a target a signal asks for no change
   (HPA's tolerance). The largest ask wins. An idle role (nothing running or waiting) asks for
   ``minReplicas``; a role with no pod answering holds, unless requests wait at the router for
   a cold start, which asks for at least one pod.
2. ``stabilize``: fast up, slow down. Up to the lowest recommendation of the scale-up window
   (default 0 s: at once), down only to the highest of the scale-down window (default 300 s:
   a dip must last that long), each step at most ``maxPodsPerStep`` pods. Waking from zero
   skips the window: a request is waiting.
3. ``joint``: prefill follows decode (``FixedRatio``) or stays within ratio bounds
   (``Independent``); a disaggregated service is either at zero in both roles or has at least
   one pod in each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.operator.autoscale.config import FIXED_RATIO, JointPolicy, RoleAutoscaling
from splitserve.operator.autoscale.signals import RoleSignals, RouterSignals

TOLERANCE = 0.1

# Event reasons (also status.autoscaling.<role>.reason)
SCALED_UP, SCALED_DOWN = "ScaledUp", "ScaledDown"
SCALED_FROM_ZERO, SCALED_TO_ZERO = "ScaledFromZero", "ScaledToZero"


@dataclass(frozen=True)
class Recommendation:
    """What the signals ask for, bounded by min/max, and why."""

    replicas: int
    why: str


@dataclass(frozen=True)
class Step:
    """One role's size after the windows and step limits."""

    replicas: int
    why: str


def _ask(current: int, total: float, target: float) -> int:
    """Pods for an additive signal: ``ceil(total / target)``, or ``current`` within tolerance."""
    if current > 0 and abs(total / (current * target) - 1) <= TOLERANCE:
        return current
    return math.ceil(total / target - 1e-9)


def _ask_latency(current: int, p90: float, target: float) -> int:
    ratio = p90 / target
    if abs(ratio - 1) <= TOLERANCE:
        return current
    return max(1, math.ceil(current * ratio - 1e-9))


def recommend(
    cfg: RoleAutoscaling, current: int, s: RoleSignals, router: RouterSignals
) -> Recommendation:
    """The size ``s`` asks for (see the module doc), within ``[minReplicas, maxReplicas]``."""
    if s.pods == 0:
        if router.demand:
            n = cfg.clamp(max(1, cfg.min_replicas))
            return Recommendation(
                n,
                f"{router.waiting:g} requests wait at the router with no pod ready "
                f"({router.new_requests:g} new)",
            )
        if current == 0:
            return Recommendation(cfg.clamp(0), "scaled to zero, no request waiting")
        return Recommendation(current, "no pod reported metrics yet: holding")
    if s.idle and not router.demand:
        return Recommendation(cfg.clamp(0), f"idle ({s.describe()})")
    t = cfg.targets
    asks: list[tuple[int, str]] = []
    per_pod = s.waiting / s.pods, s.running / s.pods
    if t.queue_depth is not None:
        asks.append((_ask(current, s.waiting, t.queue_depth),
                     f"waiting {per_pod[0]:.2f}/pod vs target {t.queue_depth:g}"))  # fmt: skip
    if t.concurrency is not None:
        asks.append((_ask(current, s.running, t.concurrency),
                     f"running {per_pod[1]:.2f}/pod vs target {t.concurrency:g}"))  # fmt: skip
    if t.kv_cache_usage is not None:
        asks.append((_ask(current, s.kv_usage * s.pods, t.kv_cache_usage),
                     f"kv usage {s.kv_usage:.2f} vs target {t.kv_cache_usage:g}"))  # fmt: skip
    if t.ttft_seconds is not None and s.ttft_p90 is not None:
        asks.append((_ask_latency(current, s.ttft_p90, t.ttft_seconds),
                     f"ttft p90 {s.ttft_p90:.3f}s vs target {t.ttft_seconds:g}s"))  # fmt: skip
    if t.itl_seconds is not None and s.itl_p90 is not None:
        asks.append((_ask_latency(current, s.itl_p90, t.itl_seconds),
                     f"itl p90 {s.itl_p90:.3f}s vs target {t.itl_seconds:g}s"))  # fmt: skip
    if not asks:
        return Recommendation(current, f"no target has data this interval ({s.describe()})")
    n, why = max(asks, key=lambda a: a[0])
    # Busy pods are never asked to go to zero (only an idle role is).
    return Recommendation(cfg.clamp(max(n, 1)), f"{why} ({s.describe()})")


def stabilize(
    cfg: RoleAutoscaling,
    current: int,
    now: float,
    history: Sequence[tuple[float, int]],
    rec: Recommendation,
    since: float,
) -> Step:
    """The next size given the recommendations of the windows (``history``: (time,
    replicas) of earlier passes, oldest first; ``rec`` is this pass's). ``since``: when this
    autoscaler started watching: it scales down only after one whole scale-down window of
    recommendations (an operator restart forgets them)."""
    if current == 0 and rec.replicas > 0:
        return Step(rec.replicas, rec.why)  # waking up: a request waits for this pod
    up_window = [n for t, n in history if now - t <= cfg.scale_up.stabilization_seconds]
    down_window = [n for t, n in history if now - t <= cfg.scale_down.stabilization_seconds]
    up = min([*up_window, rec.replicas])
    down = max([*down_window, rec.replicas])
    if up > current:
        n = min(up, current + cfg.scale_up.max_pods_per_step)
        return Step(n, rec.why)
    window = cfg.scale_down.stabilization_seconds
    if down < current and now - since >= window:
        n = max(down, current - cfg.scale_down.max_pods_per_step)
        return Step(n, f"{rec.why}; the most asked for over the last {window} s: {down}")
    return Step(current, rec.why)


def joint(
    policy: JointPolicy,
    prefill_cfg: RoleAutoscaling | None,
    prefill: Step,
    decode: int,
) -> Step:
    """Prefill's size given decode's (both after their own windows)."""
    if prefill_cfg is None:  # a fixed prefill pool
        return prefill
    n, why = prefill.replicas, prefill.why
    low, high = policy.prefill_bounds(decode)
    if policy.policy == FIXED_RATIO:
        n = low
        why = f"follows decode: ceil({decode} x {policy.prefill_per_decode:g}) = {low}"
    else:
        if n < low:
            n, why = low, f"{why}; at least {policy.min_prefill_per_decode:g} per decode pod"
        if high is not None and n > high:
            n, why = high, f"{why}; at most {policy.max_prefill_per_decode:g} per decode pod"
    n = prefill_cfg.clamp(n)
    if decode > 0 and n == 0:
        n, why = 1, f"{why}; decode pods need a prefill pod"
    return Step(n, why)


def reason(before: int, after: int) -> str:
    """The Event reason of a change of size."""
    if before == 0:
        return SCALED_FROM_ZERO
    if after == 0:
        return SCALED_TO_ZERO
    return SCALED_UP if after > before else SCALED_DOWN
