"""Pod status from the agent's records: container states, phase and conditions."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.cluster.nodeagent.backoff import Backoff
from splitserve.cluster.nodeagent.status import (
    ContainerRecord,
    PodView,
    merge_conditions,
    pod_phase,
    pod_status,
)


def running() -> dict[str, Any]:
    return {"running": {"startedAt": "2026-01-01T00:00:00Z"}}


def terminated(code: int) -> dict[str, Any]:
    return {"terminated": {"exitCode": code}}


def st(name: str, state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "state": state, "lastState": {"terminated": last} if last else {}}


SPEC_2 = {"containers": [{"name": "a"}, {"name": "b"}]}


@pytest.mark.parametrize(
    ("policy", "states", "phase"),
    [
        ("Always", [running(), running()], "Running"),
        ("Always", [running(), {"waiting": {"reason": "ContainerCreating"}}], "Pending"),
        ("Always", [terminated(0), terminated(1)], "Running"),  # will be restarted
        ("Never", [terminated(0), terminated(0)], "Succeeded"),
        ("Never", [terminated(0), terminated(2)], "Failed"),
        ("OnFailure", [terminated(0), terminated(0)], "Succeeded"),
        ("OnFailure", [terminated(0), terminated(1)], "Running"),
        ("Never", [running(), terminated(1)], "Running"),
    ],
)
def test_phase_like_kubelet(policy: str, states: list[dict[str, Any]], phase: str) -> None:
    spec = SPEC_2 | {"restartPolicy": policy}
    statuses = [st("a", states[0]), st("b", states[1])]
    assert pod_phase(spec, [], statuses) == phase


def test_crash_loop_counts_as_running() -> None:
    waiting = {"waiting": {"reason": "CrashLoopBackOff"}}
    statuses = [st("a", running()), st("b", waiting, last={"exitCode": 1})]
    assert pod_phase(SPEC_2, [], statuses) == "Running"


def test_init_containers_gate_the_phase() -> None:
    spec = SPEC_2 | {"initContainers": [{"name": "i"}], "restartPolicy": "Never"}
    pending = [
        st("a", {"waiting": {"reason": "PodInitializing"}}),
        st("b", {"waiting": {"reason": "PodInitializing"}}),
    ]
    assert pod_phase(spec, [st("i", running())], pending) == "Pending"
    assert pod_phase(spec, [st("i", terminated(1))], pending) == "Failed"
    always = spec | {"restartPolicy": "Always"}
    assert pod_phase(always, [st("i", terminated(1))], pending) == "Pending"


def test_terminal_pod_after_deletion() -> None:
    statuses = [st("a", terminated(137)), st("b", terminated(0))]
    assert pod_phase(SPEC_2, [], statuses, terminal=True) == "Failed"


def test_record_transitions_and_api_shape() -> None:
    r = ContainerRecord("web", "img:1", "splitserve-image@sha256:x")
    assert r.to_api()["state"] == {"waiting": {"reason": "ContainerCreating"}}
    r.set_running(1000.0, "splitserve://c-0")
    api = r.to_api()
    assert api["state"] == {"running": {"startedAt": "1970-01-01T00:16:40Z"}}
    assert api["containerID"] == "splitserve://c-0" and api["lastState"] == {}
    r.set_terminated(137, 1000.0, 1010.0)
    assert r.to_api()["state"]["terminated"]["reason"] == "Error"
    r.set_restarting("CrashLoopBackOff", "back-off 10s")
    api = r.to_api()
    assert api["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
    assert api["lastState"]["terminated"]["exitCode"] == 137
    r.restart_count = 1
    r.set_running(1020.0, "splitserve://c-1")
    api = r.to_api()
    assert "running" in api["state"] and api["lastState"]["terminated"]["exitCode"] == 137
    assert api["restartCount"] == 1


def view(ready: bool, initialized: bool = True) -> PodView:
    pod = {
        "metadata": {"name": "p"},
        "spec": SPEC_2 | {"restartPolicy": "Always"},
        "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]},
    }
    records = []
    for name in ("a", "b"):
        r = ContainerRecord(name, "img")
        r.set_running(1000.0, f"id-{name}")
        r.ready = ready or name == "a"
        r.started = True
        records.append(r)
    return PodView(pod, [], records, "10.244.0.5", "10.244.0.1", 1000.0, True, initialized)


def test_status_conditions_and_addresses() -> None:
    status = pod_status(view(ready=False), now=2000.0)
    assert status["phase"] == "Running"
    assert status["podIP"] == "10.244.0.5" and status["podIPs"] == [{"ip": "10.244.0.5"}]
    assert status["hostIP"] == "10.244.0.1"
    cond = {c["type"]: c for c in status["conditions"]}
    assert cond["PodScheduled"]["status"] == "True"  # the scheduler's, carried over
    assert cond["Initialized"]["status"] == "True"
    assert cond["ContainersReady"]["status"] == "False"
    assert cond["Ready"]["message"] == "containers with unready status: [b]"
    assert pod_status(view(ready=True), now=2000.0)["conditions"][-1]["status"] == "True"


def test_transition_time_kept_while_unchanged() -> None:
    first = merge_conditions([], [{"type": "Ready", "status": "False"}], now=100.0)
    same = merge_conditions(first, [{"type": "Ready", "status": "False"}], now=200.0)
    flipped = merge_conditions(same, [{"type": "Ready", "status": "True"}], now=300.0)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert flipped[0]["lastTransitionTime"] == "1970-01-01T00:05:00Z"


def test_crash_loop_backoff_doubles_and_caps() -> None:
    b = Backoff(initial=10, maximum=40)
    key, t = "pod/c", 0.0
    waits = []
    for _ in range(5):
        assert not b.in_backoff(key, t, t + b.delay(key))  # free once the delay passed
        start = t + b.delay(key) if b.delay(key) else t
        waits.append(start - t)
        b.next(key, t, start)
        t = start + 1.0  # it crashes one second after each start
        assert b.in_backoff(key, t, t + 0.5)
    assert waits == [0, 10, 20, 40, 40]  # first restart at once, then 10 s doubling, capped


def test_backoff_resets_after_a_long_run() -> None:
    b = Backoff(initial=10, maximum=40)
    b.next("k", 0.0, 0.0)
    b.next("k", 5.0, 15.0)
    assert b.delay("k") == 20
    assert not b.in_backoff("k", 15.0 + 81.0, 15.0 + 81.5)  # ran > 2 x maximum: reset
    b.next("k", 96.0, 96.0)
    assert b.delay("k") == 10
