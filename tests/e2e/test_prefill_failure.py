"""Scenario d: prefill pods die in the middle of requests.

Two InferenceServices start together: 3 prefill + 1 decode pods with
`kvTransfer.failurePolicy: recompute`, and 2 prefill + 1 decode with `fail` (NIXL). Client threads
send completions back to back, with no client retries. A prefill pod is killed while a request's
KV blocks wait on it for the decode pod, which is the moment the failure policy is about: the
decode engine is paused (SIGSTOP) and a few fresh requests are sent, so their hand-offs pile up
as leases on the prefill pods (EngineService.GetStats; the steady clients may all be past their
hand-offs, waiting on the paused decode engine), the first prefill pod holding one is killed,
and the decode engine continues (SIGCONT) and pulls from a pod that is gone. The pause lasts
about a second, shorter than the router's and the probes' timeouts. Two ways to kill:

- `kubectl delete pod --grace-period=0 --force` (the DeleteOptions gracePeriodSeconds=0 it
  sends: the object goes at once, the node agent kills the processes on the watch event);
- SIGKILL to the engine process itself, found through the node agent's state folder (the
  container's init pid); the container restarts, as kubelet would restart it.

recompute (both kills, one after the other, each on a different pod): every request completes
with the offline text. fail (SIGKILL): every request completes with the offline text or ends with
a clear error (an HTTP error status with a message, never a hang or a cut connection). In both,
the kill really hit a hand-off: the decode pod counted failed KV pulls.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import e2e_support as S
import openai
import pytest
from kubernetes import client

from splitserve.cluster.controlplane.testing import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CLIENTS = 3
AFTER_KILL = 3  # requests that must complete after a kill before the next step


# Enough prefill pods that one is left serving after the kills (none waits for a replacement).
PREFILLS = {"recompute": 3, "fail": 2}
KILLS = {"recompute": ("force delete", "SIGKILL"), "fail": ("SIGKILL",)}


@pytest.fixture(scope="module")
def services(namespaces: S.Namespaces, custom) -> dict[str, S.Isvc]:
    out = {}
    for policy, prefills in PREFILLS.items():
        ns = namespaces.create(f"kill-{policy}")
        body = S.isvc_body(
            "chat", prefill=prefills, decode=1, transport="nixl", failure_policy=policy
        )
        out[policy] = S.Isvc.create(custom, ns, body)
    return out


class Clients:
    """Threads sending completions of the long prompts without pause."""

    def __init__(self, sdk: openai.OpenAI) -> None:
        self.sdk = sdk
        self.results: list[tuple[float, float, str, str | None, Exception | None]] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CLIENTS)
        ]

    def _run(self, k: int) -> None:
        i = k
        while not self.stop.is_set():
            self._one(S.PROMPTS[i % len(S.PROMPTS)])
            i += 1

    def _one(self, prompt: str) -> None:
        begun = time.monotonic()
        try:
            text, error = S.complete(self.sdk, "smollm2", prompt), None
        except Exception as exc:  # noqa: BLE001 - every outcome is checked
            text, error = None, exc
        self.results.append((begun, time.monotonic(), prompt, text, error))

    def kick(self, n: int) -> None:
        """Send `n` more requests at once, each once (checked like the rest). While the decode
        engine is paused the steady clients may all be waiting on it past their hand-offs; these
        go through a prefill pod and leave their hand-offs there."""
        for k in range(n):
            t = threading.Thread(target=self._one, args=(S.PROMPTS[k % len(S.PROMPTS)],))
            t.daemon = True
            t.start()
            self.threads.append(t)

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)

    def done_after(self, moment: float) -> int:
        return sum(1 for r in self.results if r[0] > moment)


def failed_pulls(core, isvc: S.Isvc) -> float:
    """Failed KV pulls counted by the decode pods, so far."""
    total = 0.0
    for pod in S.engine_pods(core, isvc.namespace, isvc.name, "decode"):
        if pod.status.pod_ip:  # ready or not (a probe may have missed the pause)
            samples = S.scrape(pod.status.pod_ip)
            total += S.metric_sum(samples, "splitserve:kv_transfer_failures_total")
    return total


def ready_pods(core, isvc: S.Isvc, role: str) -> list[client.V1Pod]:
    pods = S.engine_pods(core, isvc.namespace, isvc.name, role)
    return sorted((p for p in pods if S.pod_ready(p)), key=lambda p: p.metadata.name)


def kill_during_handoff(
    isvc: S.Isvc,
    core: client.CoreV1Api,
    node_state: Path,
    kill: Callable[[client.V1Pod], None],
    spare: set[str],
    clients: Clients,
) -> str:
    """Pause the decode engine, send a few fresh requests (their hand-offs wait on the prefill
    pods), kill the first prefill pod (not in ``spare``) that holds a hand-off lease, resume the
    decode engine; the killed pod's name."""
    (decode,) = ready_pods(core, isvc, "decode")
    engine = S.container_pids(node_state, decode, "engine")[1]
    candidates = [p for p in ready_pods(core, isvc, "prefill") if p.metadata.name not in spare]
    os.kill(engine, signal.SIGSTOP)
    try:
        clients.kick(2 * len(candidates))

        def holding() -> client.V1Pod | None:
            for pod in candidates:
                if S.engine_stats(pod.status.pod_ip, timeout=1.0).num_active_leases:
                    return pod
            return None

        target = wait_until("a prefill pod holding a hand-off", holding, timeout=10, interval=0.01)
        victim = S.container_pids(node_state, target, "engine")[1]
        kill(target)
        # The engine process must be gone before the decode engine goes on to pull from it
        # (after a forced delete the node agent kills it on the watch event, a moment later).
        wait_until(
            f"engine process {victim} gone", lambda: not _alive(victim), timeout=5, interval=0.01
        )
    finally:
        os.kill(engine, signal.SIGCONT)
    return target.metadata.name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def force_delete(core: client.CoreV1Api) -> Callable[[client.V1Pod], None]:
    def kill(pod: client.V1Pod) -> None:
        # What `kubectl delete pod --grace-period=0 --force` sends (without kubectl's start-up).
        options = client.V1DeleteOptions(grace_period_seconds=0)
        core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, body=options)

    return kill


def sigkill(node_state: Path) -> Callable[[client.V1Pod], None]:
    def kill(pod: client.V1Pod) -> None:
        os.kill(S.container_pids(node_state, pod, "engine")[1], signal.SIGKILL)

    return kill


@pytest.mark.parametrize("policy", list(PREFILLS))
def test_prefill_pod_killed_mid_request(
    policy: str, services, core: client.CoreV1Api, node_state: Path, offline
) -> None:
    isvc = services[policy]
    isvc.wait_ready()
    sdk = S.openai_client(S.service_url(isvc.namespace, isvc.name))
    S.wait_serving(sdk, "smollm2")
    killed: set[str] = set()
    with Clients(sdk) as clients:
        wait_until("requests flowing", lambda: len(clients.results) >= CLIENTS, timeout=120)
        for how in KILLS[policy]:
            kill = force_delete(core) if how == "force delete" else sigkill(node_state)
            before = failed_pulls(core, isvc)
            killed.add(
                kill_during_handoff(isvc, core, node_state, kill, spare=killed, clients=clients)
            )
            moment = time.monotonic()
            # The held hand-off fails at once (peer gone) or at the pull's deadline (10 s).
            wait_until(
                f"the decode pod counting a failed KV pull after the {how}",
                lambda b=before: failed_pulls(core, isvc) > b,
                timeout=60,
            )
            wait_until(
                f"requests served after the {how}",
                lambda m=moment: clients.done_after(m) >= AFTER_KILL,
                timeout=180,
            )

    wrong = [(p, t) for _, _, p, t, e in clients.results if e is None and t != offline.text(p)]
    assert not wrong, f"wrong texts: {wrong[:3]}"
    errors = [e for *_, e in clients.results if e is not None]
    if policy == "recompute":
        assert not errors, f"{len(errors)} of {len(clients.results)} failed: {errors[:3]}"
    for e in errors:  # fail: a clear error, never a hang or a cut connection
        assert isinstance(e, openai.APIStatusError), repr(e)
        assert e.status_code >= 500 and str(e.message).strip(), repr(e)
