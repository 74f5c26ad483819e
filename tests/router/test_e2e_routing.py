"""Prefix-aware routing and pod failure against real engine processes.

Routing: 2 prefill pods + 1 decode pod. 4 groups of requests share a 1,000-token prefix each. A
warm-up request per group pays the compulsory miss; then each group's 5 requests must land on the
prefill pod that holds their prefix (exactly one pod's prefix-cache counters move), and the pool's
prefix-cache hit rate, read from the pods' /metrics, must exceed 80%. A second router over the same
pods with ``round_robin`` serves fresh groups the same way and must hit measurably less.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
PREFIX_TOKENS = 1000
GROUPS = 4
PER_GROUP = 5


def group_prompts(seed: int) -> list[list[list[int]]]:
    """GROUPS x (1 warm-up + PER_GROUP) token-id prompts: a shared prefix plus a short suffix."""
    rng = random.Random(seed)
    out = []
    for _ in range(GROUPS):
        prefix = [rng.randrange(1000, 40000) for _ in range(PREFIX_TOKENS)]
        out.append([prefix + [rng.randrange(1000, 40000) for _ in range(8)] for _ in range(6)])
    return out


def prefix_counters(metrics: dict[str, float]) -> tuple[float, float]:
    queries = sum(v for k, v in metrics.items() if k.startswith("vllm:prefix_cache_queries"))
    hits = sum(v for k, v in metrics.items() if k.startswith("vllm:prefix_cache_hits"))
    return queries, hits


@pytest.fixture(scope="module")
def two_prefill(serve_factory):
    stack = serve_factory(["--prefill-replicas", "2", "--decode-replicas", "1"])
    yield stack
    assert stack.stop() == 0


def run_workload(url: str, stack, prompts) -> dict:
    """Warm-up, then each group's requests concurrently; per-group pod attribution + hit rate."""
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    names = sorted(n for n in stack.engines if n.startswith("prefill"))

    def send(prompt):
        return sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)

    def counters():
        return {n: prefix_counters(stack.engine_metrics(n)) for n in names}

    with ThreadPoolExecutor(PER_GROUP) as pool:
        before_warm = counters()
        list(pool.map(send, [g[0] for g in prompts]))  # the compulsory misses, concurrently
        after_warm = counters()
        per_group = []
        cached = 0
        for g in prompts:
            start = counters()
            for r in pool.map(send, g[1:]):
                cached += r.usage.prompt_tokens_details.cached_tokens
            end = counters()
            per_group.append([n for n in names if end[n][0] > start[n][0]])
        final = counters()
    queries = sum(final[n][0] - after_warm[n][0] for n in names)
    hits = sum(final[n][1] - after_warm[n][1] for n in names)
    cold_q = sum(final[n][0] - before_warm[n][0] for n in names)
    cold_h = sum(final[n][1] - before_warm[n][1] for n in names)
    warm_pods = {n for n in names if after_warm[n][0] > before_warm[n][0]}
    return {
        "per_group": per_group,
        "hit_rate": hits / queries,
        "hit_rate_with_warmup": cold_h / cold_q,
        "warm_pods": warm_pods,
        "cached_tokens": cached,
    }


def test_prefix_routing_keeps_groups_on_one_pod_and_beats_round_robin(two_prefill, router_factory):
    prefix = run_workload(two_prefill.url, two_prefill, group_prompts(seed=1))
    print("prefix-aware:", prefix)
    assert all(len(pods) == 1 for pods in prefix["per_group"]), prefix["per_group"]
    assert len(prefix["warm_pods"]) == 2  # the four prefixes were spread over both pods
    assert prefix["hit_rate"] > 0.8
    assert prefix["cached_tokens"] >= GROUPS * PER_GROUP * (PREFIX_TOKENS - 16)

    grpc = [f"127.0.0.1:{two_prefill.engines[n][0]}" for n in sorted(two_prefill.engines)]
    decode = [a for n, a in zip(sorted(two_prefill.engines), grpc, strict=True) if "decode" in n]
    prefill = [a for n, a in zip(sorted(two_prefill.engines), grpc, strict=True) if "prefill" in n]
    rr = router_factory(
        ["--policy", "round_robin", "--prefill-endpoints", ",".join(prefill),
         "--decode-endpoints", ",".join(decode)]
    )  # fmt: skip
    robin = run_workload(rr.url, two_prefill, group_prompts(seed=2))
    print("round-robin:", robin)
    assert any(len(pods) == 2 for pods in robin["per_group"])
    assert robin["hit_rate"] < prefix["hit_rate"] - 0.1
    assert robin["hit_rate_with_warmup"] < prefix["hit_rate_with_warmup"] - 0.1


def _running(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


def test_pod_killed_mid_request_is_retried_elsewhere(engine_factory, router_factory):
    """Two colocated engines; the one running a non-streaming request is SIGKILLed mid-way."""
    pods = [engine_factory("decode", "--colocated") for _ in range(2)]
    router = router_factory(["--colocated-endpoints", ",".join(addr for _, addr, _ in pods)])
    deadline = time.monotonic() + 300
    while httpx.get(router.url + "/health").json()["decode_pods"] < 2:
        assert time.monotonic() < deadline, "engines never became ready"
        time.sleep(0.2)
    sdk = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    result: dict = {}

    def call() -> None:
        try:
            result["r"] = sdk.completions.create(
                model=MODEL, prompt="Tell me a long story.", max_tokens=120, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["err"] = err

    thread = threading.Thread(target=call)
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None:
        assert time.monotonic() < deadline, "the request never started on a pod"
        for proc, _, mport in pods:
            if _running(mport) >= 1:
                victim = proc
        time.sleep(0.05)
    time.sleep(0.5)  # let it stream some tokens first
    victim.proc.send_signal(signal.SIGKILL)
    thread.join(120)
    assert "err" not in result, result.get("err")
    r = result["r"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 120
    metrics = httpx.get(router.url + "/metrics").text
    retries = [
        ln for ln in metrics.splitlines() if ln.startswith("splitserve_router_retries_total")
    ]
    assert float(retries[0].rpartition(" ")[2]) >= 1
