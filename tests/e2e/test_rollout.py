"""Scenario c: a model-revision rollout while clients stream without pause.

A 1P:1D InferenceService over NIXL serves two client threads that stream completions back to
back, with no retries. The model revision changes (it is part of the engines' KV compatibility
hash, so old and new pods cannot share KV blocks): a new generation of prefill and decode pods
comes up beside the old one, which serves until the new one is ready, then goes.

What must hold, and how it is observed:
- 0 failed requests, every text the offline one (the clients' own results);
- the rollout really changed the compatibility hash (EngineService.GetInfo of every engine pod,
  old and new: otherwise a cross pairing would be harmless and the check below vacuous);
- no prefill/decode pair with different compatibility hashes ever served: a decode pod refuses
  a hand-off from an incompatible prefill at the KV handshake and counts it in
  `splitserve:kv_transfer_failures` (then recomputes: the text alone would not show it). Every
  decode pod is scraped all along (the old ones before they go): no failure anywhere, and KV
  blocks arrived at old and at new decode pods, so both generations served hand-offs.
"""

from __future__ import annotations

import contextlib
import threading
import time

import e2e_support as S
import pytest
from kubernetes import client

from splitserve.cluster.controlplane.testing import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CLIENTS = 2
# After the switch the clients go on this long against the new generation alone.
SETTLE_S = 5.0


class Watcher(threading.Thread):
    """Polls every engine pod of the InferenceService: compat hash (once), decode metrics."""

    def __init__(self, core: client.CoreV1Api, isvc: S.Isvc) -> None:
        super().__init__(daemon=True)
        self.core, self.isvc = core, isvc
        self.compat: dict[str, tuple[str, str, str]] = {}  # pod -> (role, rollout label, hash)
        self.decode_metrics: dict[str, dict[tuple, float]] = {}  # pod -> last scrape
        self.errors: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - kept and reported by the test
                self.errors.append(repr(exc))
            self.stopped.wait(0.5)

    def poll(self) -> None:
        for role in ("prefill", "decode"):
            for pod in S.engine_pods(self.core, self.isvc.namespace, self.isvc.name, role):
                ip, name = pod.status.pod_ip, pod.metadata.name
                if not ip or not S.pod_ready(pod):
                    continue
                label = pod.metadata.labels["serving.splitserve.io/rollout-hash"]
                if name not in self.compat:
                    self.compat[name] = (role, label, S.engine_info(ip).kv_compat_hash)
                if role == "decode":
                    with contextlib.suppress(OSError):  # going away: its last scrape stands
                        self.decode_metrics[name] = S.scrape(ip)


def test_rollout_while_streaming(namespaces: S.Namespaces, custom, core, offline) -> None:
    ns = namespaces.create("roll")
    body = S.isvc_body("chat", prefill=1, decode=1, transport="nixl", revision="r1")
    isvc = S.Isvc.create(custom, ns, body)
    first = isvc.wait_ready()["status"]["rolloutHash"]
    sdk = S.openai_client(S.service_url(ns, "chat"))
    S.wait_serving(sdk, "smollm2")
    expected = {p: offline.text(p) for p in S.PROMPTS}

    watcher = Watcher(core, isvc)
    watcher.start()
    results: list[tuple[float, str, str | None, str | None]] = []
    stop = threading.Event()

    def client_loop(offset: int) -> None:
        i = offset
        while not stop.is_set():
            prompt = S.PROMPTS[i % len(S.PROMPTS)]
            i += 1
            try:
                text, error = S.stream(sdk, "smollm2", prompt), None
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                text, error = None, f"{type(exc).__name__}: {exc}"
            results.append((time.monotonic(), prompt, text, error))

    clients = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in clients:
        t.start()
    try:
        wait_until("requests flowing before the rollout", lambda: len(results) >= 4, timeout=60)
        isvc.patch({"spec": {"model": {"revision": "r2"}}})
        switched = time.monotonic()

        def new_generation_alone() -> bool:
            obj = isvc.rolled_out()
            if obj is None or obj["status"]["rolloutHash"] == first:
                return False
            pods = [
                p for role in ("prefill", "decode") for p in S.engine_pods(core, ns, "chat", role)
            ]
            return bool(pods) and all(
                p.metadata.labels["serving.splitserve.io/rollout-hash"] != first for p in pods
            )

        wait_until(
            "the new generation alone serving", new_generation_alone, timeout=S.READY_TIMEOUT_S
        )
        done = time.monotonic()
        wait_until(
            "requests on the new generation alone",
            lambda: (
                sum(1 for r in results if r[0] > done) >= 4 and time.monotonic() > done + SETTLE_S
            ),
            timeout=120,
        )
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=130)
        watcher.stopped.set()
        watcher.join(timeout=30)

    failed = [r for r in results if r[3] is not None]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    wrong = [(p, t) for _, p, t, _ in results if t != expected[p]]
    assert not wrong, f"wrong texts: {wrong[:5]}"
    during = [r for r in results if switched <= r[0] <= done]
    assert len(during) >= 4, f"only {len(during)} requests completed during the rollout"

    # The rollout changed the KV compatibility hash: cross pairs would have been refused.
    by_label: dict[str, set[str]] = {}
    for _role, label, compat in watcher.compat.values():
        by_label.setdefault(label, set()).add(compat)
    assert set(by_label) == {first, isvc.get()["status"]["rolloutHash"]}, watcher.compat
    assert all(len(h) == 1 for h in by_label.values()), by_label  # one hash per generation
    assert len({h for hs in by_label.values() for h in hs}) == 2, by_label
    # No refused (or otherwise failed) hand-off anywhere; both generations received KV.
    received: dict[str, float] = {}
    for pod, samples in watcher.decode_metrics.items():
        failures = S.metric_sum(samples, "splitserve:kv_transfer_failures_total")
        assert failures == 0, f"{pod}: {failures} failed KV transfers"
        label = watcher.compat[pod][1]
        blocks = S.metric_sum(samples, "splitserve:kv_transfer_blocks_total", direction="received")
        received[label] = received.get(label, 0.0) + blocks
    assert set(received) == set(by_label) and all(received.values()), (received, watcher.errors)
