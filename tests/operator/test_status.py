"""Status and conditions computed from child Deployment statuses (pure functions)."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.operator.spec import parse
from splitserve.operator.status import (
    compute_status,
    invalid_spec_status,
    pod_problems,
    pods_pending,
    role_state,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def dep(replicas: int, ready: int, updated: int, total: int | None = None, **extra: Any) -> dict:
    status = {"replicas": replicas if total is None else total, "readyReplicas": ready}
    status |= {"updatedReplicas": updated, "observedGeneration": 4}
    return {"metadata": {"generation": 4}, "status": status | extra}


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


@pytest.fixture
def isvc(make_isvc):
    return parse(make_isvc())


def test_all_ready_means_ready_and_serving_the_desired_hash(isvc) -> None:
    deployments = {"prefill": dep(1, 1, 1), "decode": dep(2, 2, 2), "router": dep(1, 1, 1)}
    status = compute_status(isvc, deployments, {}, T0)
    assert conditions(status) == {
        "Ready": ("True", "AllReplicasReady"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["rolloutHash"] == isvc.spec.rollout_hash
    assert status["model"] == "pvc://weights/smollm2" and status["revision"] == "abc123"
    assert status["observedGeneration"] == 3
    assert status["decode"] == {
        "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "summary": "2/2",
        # the scale subresource's labelSelectorPath: what HPA averages over
        "selector": "serving.splitserve.io/inferenceservice=chat,serving.splitserve.io/role=decode",
    }  # fmt: skip
    assert status["url"] == "http://chat.ml.svc.cluster.local"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_rollout_in_progress_keeps_the_old_hash_as_served(isvc) -> None:
    previous = {"rolloutHash": "old", "model": "pvc://weights/old", "revision": "r1"}
    # decode surged: 3 pods for 2 desired, 1 updated.
    deployments = {"prefill": dep(1, 1, 1), "decode": dep(2, 2, 1, total=3), "router": dep(1, 1, 1)}
    status = compute_status(isvc, deployments, previous, T0)
    assert conditions(status)["Ready"] == ("False", "RollingOut")
    assert conditions(status)["Progressing"] == ("True", "RollingOut")
    assert conditions(status)["Degraded"][0] == "False"
    assert status["rolloutHash"] == "old" and status["revision"] == "r1"
    assert status["desiredRolloutHash"] == isvc.spec.rollout_hash
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert "decode 1/2 updated" in progressing["message"]


def test_controller_not_caught_up_is_progressing(isvc) -> None:
    stale = dep(2, 2, 2)
    stale["metadata"]["generation"] = 5  # a new template the controller has not seen yet
    deployments = {"prefill": dep(1, 1, 1), "decode": stale, "router": dep(1, 1, 1)}
    status = compute_status(isvc, deployments, {}, T0)
    assert conditions(status)["Progressing"][0] == "True"
    assert status["rolloutHash"] == ""


def test_stuck_rollout_is_degraded(isvc) -> None:
    stuck = dep(2, 1, 1, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": "ReplicaSet has timed out progressing."}
    ])  # fmt: skip
    deployments = {"prefill": dep(1, 1, 1), "decode": stuck, "router": dep(1, 1, 1)}
    status = compute_status(isvc, deployments, {}, T0)
    assert conditions(status)["Degraded"] == ("True", "RolloutStuck")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "decode: ProgressDeadlineExceeded" in degraded["message"]


def test_missing_deployments_are_not_ready(isvc) -> None:
    status = compute_status(isvc, {}, {}, T0)
    assert conditions(status)["Ready"][0] == "False"
    assert status["prefill"]["summary"] == "0/1"


def test_apply_problem_is_reported(isvc) -> None:
    deployments = {"prefill": dep(1, 1, 1), "decode": dep(2, 2, 2), "router": dep(1, 1, 1)}
    status = compute_status(isvc, deployments, {}, T0, ("ApplyFailed", "403 Forbidden"))
    assert conditions(status)["Ready"] == ("False", "ApplyFailed")
    assert conditions(status)["Degraded"] == ("True", "ApplyFailed")
    assert status["rolloutHash"] == ""


def test_transition_time_moves_only_when_status_flips(isvc) -> None:
    ready = {"prefill": dep(1, 1, 1), "decode": dep(2, 2, 2), "router": dep(1, 1, 1)}
    first = compute_status(isvc, ready, {}, T0)
    again = compute_status(isvc, ready, first, T1)
    assert [c["lastTransitionTime"] for c in again["conditions"]] == [T0, T0, T0]
    broken = dict(ready, decode=dep(2, 1, 2))
    flipped = compute_status(isvc, broken, again, T1)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times["Ready"] == T1 and times["Degraded"] == T0


def test_colocated_reports_an_empty_prefill_pool(make_isvc) -> None:
    isvc = parse(make_isvc({"prefill": {"replicas": 0}}))
    status = compute_status(isvc, {"decode": dep(2, 2, 2), "router": dep(1, 1, 1)}, {}, T0)
    assert conditions(status)["Ready"] == ("True", "AllReplicasReady")
    assert status["prefill"]["summary"] == "0/0"


def test_invalid_spec_keeps_what_is_served() -> None:
    previous = {"rolloutHash": "h1", "model": "hf://a/b", "url": "http://x"}
    status = invalid_spec_status(7, "spec.engine.blockSize: bad", previous, T0)
    assert status["rolloutHash"] == "h1" and status["observedGeneration"] == 7
    assert conditions(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }


def test_role_state_without_generation_is_current() -> None:
    state = role_state(
        "decode", 2, {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    )
    assert state.rolled_out


def crashing_pod(name: str, role: str, reason: str = "CrashLoopBackOff") -> dict:
    last = {"exitCode": 1, "message": "Traceback ...\n  ...\nValueError: no such model /m/x\n"}
    return {
        "metadata": {"name": name, "labels": {"serving.splitserve.io/role": role}},
        "status": {
            "containerStatuses": [
                {
                    "name": "engine",
                    "state": {"waiting": {"reason": reason, "message": "back-off 20s ..."}},
                    "lastState": {"terminated": last},
                    "restartCount": 3,
                }
            ]
        },
    }


def test_pod_problems_name_the_pod_and_its_last_words() -> None:
    running = {"metadata": {"name": "ok"}, "status": {"containerStatuses": [{"state": {}}]}}
    gone = crashing_pod("old", "decode") | {"metadata": {"name": "old", "deletionTimestamp": T0}}
    lines = pod_problems([crashing_pod("b", "decode"), running, gone, crashing_pod("a", "prefill")])
    assert lines == [
        "pod a (prefill) container engine: CrashLoopBackOff, exit code 1: "
        "ValueError: no such model /m/x",
        "pod b (decode) container engine: CrashLoopBackOff, exit code 1: "
        "ValueError: no such model /m/x",
    ]


def test_failing_pods_make_degraded(isvc) -> None:
    deps = {"prefill": dep(1, 0, 1), "decode": dep(2, 0, 2), "router": dep(1, 1, 1)}
    failing = pod_problems([crashing_pod("a", "decode")])
    status = compute_status(isvc, deps, {}, T0, failing=failing)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Degraded"]["status"], by_type["Degraded"]["reason"]) == ("True", "PodsFailing")
    assert "no such model" in by_type["Degraded"]["message"]
    assert by_type["Ready"]["status"] == "False"


def test_failed_download_step_is_model_download_failed(isvc) -> None:
    last = {"exitCode": 1, "message": "resolving ...\npull-model: error: hf://o/n is gated and "
            "no token is given: put HF_TOKEN ...\n"}  # fmt: skip
    pod = {
        "metadata": {"name": "p", "labels": {"serving.splitserve.io/role": "decode"}},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "model-download",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": last},
                }
            ],
            "containerStatuses": [
                {"name": "engine", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }
    failing = pod_problems([pod])
    assert failing == [
        "pod p (decode) container model-download: CrashLoopBackOff, exit code 1: "
        "pull-model: error: hf://o/n is gated and no token is given: put HF_TOKEN ..."
    ]
    deps = {"prefill": dep(1, 0, 1), "decode": dep(2, 0, 2), "router": dep(1, 1, 1)}
    status = compute_status(isvc, deps, {}, T0, failing=failing)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelDownloadFailed")
    assert "is gated" in degraded["message"]


def test_unschedulable_pods_are_named_in_ready(isvc) -> None:
    pod = {
        "metadata": {"name": "g", "labels": {"serving.splitserve.io/role": "decode"}},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                },
            ],  # fmt: skip
        },
    }
    pending = pods_pending([pod])
    assert pending == [
        "pod g (decode) unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    ]
    deps = {"prefill": dep(1, 1, 1), "decode": dep(2, 0, 2), "router": dep(1, 1, 1)}
    status = compute_status(isvc, deps, {}, T0, pending=pending)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in by_type["Ready"]["message"]
    assert by_type["Degraded"]["status"] == "False"  # waiting for a node is not a failure
