"""Scaling and rolling on the real cluster without losing a request (docs/autoscaling.md).

a. Load up -> the operator's autoscaler grows decode (its event says why), the new pod takes
   load; load gone -> back to the minimum after the stabilization window; no request failed
   or was cut.
b. 16 streams in flight: `kubectl scale` (the CRD's scale subresource) takes decode 2 -> 1, then
   a model rollout replaces every engine pod; every stream completes with all its tokens (the
   pods drain: they finish their streams before they exit).
c. Scale from zero: both pools idle down to zero pods; the first request waits at the router,
   the operator wakes both pools on that, and the request succeeds.

Streams use ``ignore_eos`` and a fixed ``max_tokens``: "all its tokens" is exactly that count
in the usage, with finish reason ``length``.
"""

from __future__ import annotations

import threading
import time

import e2e_support as S
import openai
import pytest
from kubernetes import client

from splitserve.cluster.controlplane.testing import wait_until
from splitserve.cluster.load import Clients, Streamed, stream_counted

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1800)]

MODEL = "smollm2"
ROLLOUT_LABEL = "serving.splitserve.io/rollout-hash"


def assert_all_complete(results: list[Streamed], max_tokens: int) -> None:
    failed = [r for r in results if r.error is not None]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:3]}"
    cut = [r for r in results if not r.complete(max_tokens)]
    assert not cut, f"{len(cut)} of {len(results)} streams lost tokens: {cut[:3]}"


def clients(sdk: openai.OpenAI, count: int, max_tokens: int) -> Clients:
    """``count`` client threads streaming back to back until the block ends."""
    return Clients(sdk, MODEL, S.PROMPTS, max_tokens, count)


def autoscaled_body(name: str, decode: dict, prefill: dict | None = None, **spec) -> dict:
    body = S.isvc_body(name, prefill=1, decode=1)
    body["spec"]["decode"]["autoscaling"] = decode
    if prefill is not None:
        body["spec"]["prefill"]["autoscaling"] = prefill
    body["spec"].update(spec)
    return body


def events(core: client.CoreV1Api, ns: str, name: str) -> list[client.CoreV1Event]:
    return core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name},involvedObject.kind=InferenceService"
    ).items


def autoscaled(isvc: S.Isvc, role: str) -> int | None:
    status = isvc.get().get("status") or {}
    return ((status.get("autoscaling") or {}).get(role) or {}).get("replicas")


def ready_pods(core: client.CoreV1Api, isvc: S.Isvc, role: str) -> list[client.V1Pod]:
    return [p for p in S.engine_pods(core, isvc.namespace, isvc.name, role) if S.pod_ready(p)]


def test_load_grows_decode_and_its_end_shrinks_it(namespaces, custom, core) -> None:
    ns = namespaces.create("scale")
    body = autoscaled_body(
        "chat",
        {"minReplicas": 1, "maxReplicas": 2, "targets": {"concurrency": 2},
         "scaleDown": {"stabilizationSeconds": 30}},
    )  # fmt: skip
    isvc = S.Isvc.create(custom, ns, body)
    isvc.wait_ready()
    sdk = S.openai_client(S.service_url(ns, "chat"))
    S.wait_serving(sdk, MODEL)
    max_tokens = 24
    began = time.monotonic()
    with clients(sdk, 4, max_tokens) as load:
        wait_until("decode scaled up to 2", lambda: autoscaled(isvc, "decode") == 2, timeout=180)
        scaled_up = time.monotonic() - began
        up = [e for e in events(core, ns, "chat") if e.reason == "ScaledUp"]
        assert up and "decode 1 -> 2" in up[0].message and "vs target 2" in up[0].message
        # The new pod comes up and takes load from the router.
        wait_until("two decode pods ready", lambda: len(ready_pods(core, isvc, "decode")) == 2,
                   timeout=S.READY_TIMEOUT_S)  # fmt: skip

        def both_served() -> bool:
            served = [
                S.metric_sum(S.scrape(p.status.pod_ip), "vllm:request_success_total")
                for p in ready_pods(core, isvc, "decode")
            ]
            return len(served) == 2 and all(n > 0 for n in served)

        wait_until("both decode pods served requests", both_served, timeout=180)
        both_serving = time.monotonic() - began
    stopped = time.monotonic() - began
    assert_all_complete(load.results, max_tokens)
    wait_until("decode back to 1", lambda: autoscaled(isvc, "decode") == 1, timeout=240)
    scaled_down = time.monotonic() - began
    # Only once the window held no higher need (the decision says so, with its numbers).
    down = [e for e in events(core, ns, "chat") if e.reason == "ScaledDown"]
    assert down and "decode 2 -> 1" in down[-1].message
    assert "the most asked for over the last 30 s: 1" in down[-1].message
    print("events:", [(e.reason, e.message) for e in events(core, ns, "chat")
                      if e.reason.startswith("Scaled")])  # fmt: skip
    wait_until("one decode pod left", lambda: len(S.engine_pods(core, ns, "chat", "decode")) == 1,
               timeout=180)  # fmt: skip
    assert S.complete(sdk, MODEL, S.PROMPTS[0]) is not None
    print(
        f"load 4 streams from 0 s: decode 1 -> 2 decided at {scaled_up:.0f} s, both pods serving "
        f"at {both_serving:.0f} s; load stopped at {stopped:.0f} s after {len(load.results)} "
        f"requests (0 failed or cut); 2 -> 1 decided at {scaled_down:.0f} s"
    )


def test_scale_down_and_rollout_with_16_streams_in_flight(
    namespaces, custom, core, kubeconfig
) -> None:
    ns = namespaces.create("drain")
    body = S.isvc_body("chat", prefill=1, decode=2, revision="r1")
    body["spec"]["drainSeconds"] = 180
    isvc = S.Isvc.create(custom, ns, body)
    first = isvc.wait_ready()["status"]["rolloutHash"]
    sdk = S.openai_client(S.service_url(ns, "chat"))
    S.wait_serving(sdk, MODEL)
    wait_until("two decode pods routable",
               lambda: len(ready_pods(core, isvc, "decode")) == 2, timeout=120)  # fmt: skip
    max_tokens = 96

    # -- decode 2 -> 1 through the scale subresource, 16 streams in flight
    results: list[Streamed] = []
    threads = [
        threading.Thread(
            target=lambda k=k: results.append(
                stream_counted(sdk, MODEL, f"{S.PROMPTS[k % 4]} {k}", max_tokens)
            ),  # fmt: skip
            daemon=True,
        )
        for k in range(16)
    ]
    for t in threads:
        t.start()

    def both_busy() -> bool:
        running = [S.engine_stats(p.status.pod_ip).num_requests_running
                   for p in ready_pods(core, isvc, "decode")]  # fmt: skip
        return len(running) == 2 and all(n > 0 for n in running)

    wait_until("streams running on both decode pods", both_busy, timeout=120, interval=0.2)
    scaled = S.run_tool(
        "kubectl", "scale", "inferenceservices.serving.splitserve.io/chat", "--replicas=1",
        "-n", ns, kubeconfig=kubeconfig,
    )  # fmt: skip
    S.checked(scaled)
    wait_until(
        "one decode pod terminating",
        lambda: any(p.metadata.deletion_timestamp for p in S.engine_pods(core, ns, "chat",
                                                                          "decode")),
        timeout=60, interval=0.2,
    )  # fmt: skip
    for t in threads:
        t.join(timeout=600)
    assert len(results) == 16
    assert_all_complete(results, max_tokens)
    assert isvc.get()["spec"]["decode"]["replicas"] == 1
    assert isvc.get()["status"]["decode"]["replicas"] == 1
    wait_until("one decode pod left", lambda: len(S.engine_pods(core, ns, "chat", "decode")) == 1,
               timeout=240)  # fmt: skip

    # -- a rollout (new model revision) while 16 clients stream back to back
    busy_when_deleted: dict[str, int] = {}

    def watch_old(stop: threading.Event) -> None:
        while not stop.is_set():
            for pod in S.engine_pods(core, ns, "chat", "decode"):
                name = pod.metadata.name
                if (pod.metadata.labels[ROLLOUT_LABEL] == first and pod.metadata.deletion_timestamp
                        and name not in busy_when_deleted and pod.status.pod_ip):  # fmt: skip
                    try:
                        busy_when_deleted[name] = S.engine_stats(
                            pod.status.pod_ip
                        ).num_requests_running
                    except Exception:  # noqa: BLE001 - it may be gone already
                        busy_when_deleted[name] = -1
            stop.wait(0.2)

    stop = threading.Event()
    watcher = threading.Thread(target=watch_old, args=(stop,), daemon=True)
    watcher.start()
    with clients(sdk, 16, max_tokens) as load:
        wait_until("streams flowing", lambda: load.inflight >= 8, timeout=120)
        isvc.patch({"spec": {"model": {"revision": "r2"}}})

        def old_gone() -> bool:
            obj = isvc.rolled_out()
            pods = [p for r in ("prefill", "decode") for p in S.engine_pods(core, ns, "chat", r)]
            return (
                obj is not None
                and obj["status"]["rolloutHash"] != first
                and bool(pods)
                and all(p.metadata.labels[ROLLOUT_LABEL] != first for p in pods)
            )

        wait_until("the new generation alone", old_gone, timeout=S.READY_TIMEOUT_S + 300)
    stop.set()
    watcher.join(timeout=10)
    assert_all_complete(load.results, max_tokens)
    assert len(load.results) >= 16
    # The old decode pod was deleted with streams on it, and they still completed (above).
    assert any(n > 0 for n in busy_when_deleted.values()), busy_when_deleted
    print(
        f"scale-down: 16 of 16 streams complete; rollout: {len(load.results)} streams complete, "
        f"old decode pods' running streams when deleted: {busy_when_deleted}"
    )


def test_scale_from_zero(namespaces, custom, core) -> None:
    ns = namespaces.create("zero")
    to_zero = {"stabilizationSeconds": 20, "maxPodsPerStep": 1}
    body = autoscaled_body(
        "chat",
        {"minReplicas": 0, "maxReplicas": 1, "targets": {"concurrency": 4},
         "scaleDown": to_zero},
        prefill={"minReplicas": 0, "maxReplicas": 1, "targets": {"queueDepth": 4},
                 "scaleDown": to_zero},
        router={"replicas": 1, "policy": "least_load", "coldStartTimeoutSeconds": 600},
    )  # fmt: skip
    isvc = S.Isvc.create(custom, ns, body)
    isvc.wait_ready()
    sdk = S.openai_client(S.service_url(ns, "chat"))
    S.wait_serving(sdk, MODEL)

    def at_zero() -> bool:
        pods = [p for r in ("prefill", "decode") for p in S.engine_pods(core, ns, "chat", r)]
        return autoscaled(isvc, "decode") == 0 and autoscaled(isvc, "prefill") == 0 and not pods

    wait_until("both pools scaled to zero, their pods gone", at_zero, timeout=300)
    reasons = [e.reason for e in events(core, ns, "chat")]
    assert reasons.count("ScaledToZero") >= 2
    # The router is still in its Service (ready, holding requests): the request reaches it.
    asked = time.monotonic()
    text = S.complete(S.openai_client(S.service_url(ns, "chat")).with_options(timeout=700),
                      MODEL, S.PROMPTS[1])  # fmt: skip
    assert text
    waited = time.monotonic() - asked
    woke = [e for e in events(core, ns, "chat") if e.reason == "ScaledFromZero"]
    assert {e.message.split(" ", 1)[0] for e in woke} == {"prefill", "decode"}
    assert any("wait at the router" in e.message for e in woke)
    print(f"the first request waited {waited:.1f} s for both pools to start")
