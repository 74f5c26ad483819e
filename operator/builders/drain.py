"""How pods stop: the preStop hook and grace period that let a pod drain (docs/autoscaling.md).

When a pod is deleted (scale-down, rollout, node drain) its EndpointSlice endpoint turns
terminating at once, and the kubelet runs the preStop hook, then sends SIGTERM, then SIGKILL
when ``terminationGracePeriodSeconds`` run out. The preStop sleep gives the router (watching
EndpointSlices) and kube-proxy a moment to stop sending the pod new work while it still takes
it; SIGTERM then starts the server's own drain, which finishes in-flight streams (and, on
prefill, serves live KV leases) for up to ``spec.drainSeconds``. The grace period covers both,
plus a margin for the process to exit.
"""

from __future__ import annotations

from typing import Any

from splitserve.operator.spec import InferenceService

# Long enough for an EndpointSlice update to reach the routers' watches and kube-proxy; a
# request routed meanwhile is still served (afterwards it is refused and retried elsewhere).
PRESTOP_SECONDS = 3
EXIT_MARGIN_SECONDS = 10  # engine shutdown, KV transport teardown


def prestop_seconds(isvc: InferenceService) -> int:
    return min(PRESTOP_SECONDS, isvc.spec.drain_seconds)


def lifecycle(isvc: InferenceService) -> dict[str, Any]:
    """The container's ``lifecycle`` (a preStop sleep), or nothing when drainSeconds is 0."""
    seconds = prestop_seconds(isvc)
    return {"lifecycle": {"preStop": {"sleep": {"seconds": seconds}}}} if seconds else {}


def termination_grace_seconds(isvc: InferenceService) -> int:
    """preStop + the server's drain deadline + time to exit."""
    return prestop_seconds(isvc) + isvc.spec.drain_seconds + EXIT_MARGIN_SECONDS
