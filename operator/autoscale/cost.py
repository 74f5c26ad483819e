"""Which pod goes first on scale-down: ``controller.kubernetes.io/pod-deletion-cost``.

The ReplicaSet controller deletes the pods with the lowest cost first (after pods that are not
ready). Before it scales a role down, the operator sets each ready pod's cost from its load, so
the least-loaded pod goes: the fewest streams to drain and the fewest KV blocks to lose.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.operator.autoscale.metrics import EngineSample

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"


def deletion_costs(samples: Sequence[EngineSample]) -> dict[str, str]:
    """Pod name -> cost (a decimal int32 string): 1000 per request on the pod, plus its KV use
    in thousandths (so equal request counts are ordered by cache held)."""
    return {
        s.pod: str(min(2**31 - 1, int(s.load) * 1000 + int(round(s.kv_usage * 999))))
        for s in samples
    }
