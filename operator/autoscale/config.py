"""The typed ``autoscaling`` parts of an InferenceService spec, parsed and checked.

``prefill.autoscaling`` / ``decode.autoscaling`` (per role: bounds, targets, scale-up and
scale-down behaviour, or ``external``) and ``spec.autoscaling`` (how the two roles are tied:
``Independent`` within optional ratio bounds, or ``FixedRatio``). Parsed from a body the CRD's
defaults were applied to; what a schema cannot say is checked by ``semantic_errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitserve.operator.crd import FieldError

INDEPENDENT, FIXED_RATIO = "Independent", "FixedRatio"


@dataclass(frozen=True)
class Targets:
    """Per-pod objectives; None: not used. The pool grows until every one is met."""

    queue_depth: float | None = None  # vllm:num_requests_waiting per pod
    concurrency: float | None = None  # vllm:num_requests_running per pod
    kv_cache_usage: float | None = None  # mean vllm:kv_cache_usage_perc (0-1)
    ttft_seconds: float | None = None  # p90 vllm:time_to_first_token_seconds, last interval
    itl_seconds: float | None = None  # p90 vllm:inter_token_latency_seconds, last interval

    @property
    def any(self) -> bool:
        return any(v is not None for v in vars(self).values())


@dataclass(frozen=True)
class Behavior:
    """One direction of scaling: the stabilization window and the largest step."""

    stabilization_seconds: int
    max_pods_per_step: int


@dataclass(frozen=True)
class RoleAutoscaling:
    """``prefill.autoscaling`` or ``decode.autoscaling``."""

    min_replicas: int
    max_replicas: int
    targets: Targets = Targets()
    scale_up: Behavior = Behavior(0, 4)
    scale_down: Behavior = Behavior(300, 1)
    external: bool = False  # HPA / KEDA own spec.<role>.replicas (decode only)

    @property
    def managed(self) -> bool:
        """The operator decides this role's replicas."""
        return not self.external

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class JointPolicy:
    """``spec.autoscaling``: how prefill's size relates to decode's."""

    policy: str = INDEPENDENT
    prefill_per_decode: float | None = None  # FixedRatio
    min_prefill_per_decode: float | None = None  # Independent bounds
    max_prefill_per_decode: float | None = None

    def prefill_bounds(self, decode: int) -> tuple[int, int | None]:
        """(lowest, highest or None) prefill pods this policy allows next to ``decode`` pods."""
        if self.policy == FIXED_RATIO:
            assert self.prefill_per_decode is not None
            n = math.ceil(decode * self.prefill_per_decode - 1e-9)
            return n, n
        low = 0
        if self.min_prefill_per_decode is not None:
            low = math.ceil(decode * self.min_prefill_per_decode - 1e-9)
        high = None
        if self.max_prefill_per_decode is not None:
            high = math.floor(decode * self.max_prefill_per_decode + 1e-9)
        return low, high


def parse_role(a: Mapping[str, Any] | None) -> RoleAutoscaling | None:
    """The typed role autoscaling of a defaulted spec section (None when absent)."""
    if not a:
        return None
    t, up, down = a.get("targets") or {}, a.get("scaleUp") or {}, a.get("scaleDown") or {}
    return RoleAutoscaling(
        min_replicas=int(a.get("minReplicas", 1)),
        max_replicas=int(a["maxReplicas"]),
        targets=Targets(
            queue_depth=_number(t.get("queueDepth")),
            concurrency=_number(t.get("concurrency")),
            kv_cache_usage=_number(t.get("kvCacheUsage")),
            ttft_seconds=_number(t.get("ttftSeconds")),
            itl_seconds=_number(t.get("itlSeconds")),
        ),
        scale_up=Behavior(int(up.get("stabilizationSeconds", 0)), int(up.get("maxPodsPerStep", 4))),
        scale_down=Behavior(
            int(down.get("stabilizationSeconds", 300)), int(down.get("maxPodsPerStep", 1))
        ),
        external=bool(a.get("external", False)),
    )


def parse_joint(a: Mapping[str, Any] | None) -> JointPolicy:
    a = a or {}
    return JointPolicy(
        policy=a.get("policy", INDEPENDENT),
        prefill_per_decode=_number(a.get("prefillPerDecode")),
        min_prefill_per_decode=_number(a.get("minPrefillPerDecode")),
        max_prefill_per_decode=_number(a.get("maxPrefillPerDecode")),
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def semantic_errors(spec: Mapping[str, Any]) -> list[FieldError]:
    """What the CRD schema cannot say about a defaulted spec's autoscaling."""
    errors: list[FieldError] = []
    colocated = spec["prefill"]["replicas"] == 0
    joint = spec.get("autoscaling") or {}
    fixed = joint.get("policy") == FIXED_RATIO
    for role in ("prefill", "decode"):
        a = spec[role].get("autoscaling")
        if not a:
            continue
        path = f"spec.{role}.autoscaling"
        if a.get("minReplicas", 1) > a["maxReplicas"]:
            errors.append(FieldError(f"{path}.minReplicas", "must not exceed maxReplicas"))
        external = a.get("external", False)
        follows = role == "prefill" and fixed  # sized from decode: its targets are unused
        if not external and not follows and not (a.get("targets") or {}):
            errors.append(
                FieldError(f"{path}.targets", "set at least one target (or external: true)")
            )
        if role == "prefill" and colocated:
            errors.append(
                FieldError(path, "needs prefill pods: prefill.replicas 0 means colocated")
            )
        if role == "prefill" and external:
            errors.append(
                FieldError(
                    f"{path}.external",
                    "prefill has no scale subresource: scale decode externally and let "
                    "prefill follow (autoscaling.policy FixedRatio)",
                )
            )
    if fixed:
        if joint.get("prefillPerDecode") is None:
            errors.append(
                FieldError("spec.autoscaling.prefillPerDecode", "FixedRatio needs a ratio")
            )
        if not spec["prefill"].get("autoscaling"):
            errors.append(
                FieldError(
                    "spec.prefill.autoscaling",
                    "FixedRatio sizes prefill from decode: give prefill its bounds "
                    "(minReplicas, maxReplicas)",
                )
            )
    low, high = joint.get("minPrefillPerDecode"), joint.get("maxPrefillPerDecode")
    if low is not None and high is not None and low > high:
        errors.append(
            FieldError("spec.autoscaling.minPrefillPerDecode", "must not exceed the maximum")
        )
    return errors
