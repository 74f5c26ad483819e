"""Graceful drain with real processes: a decode pod stopped (SIGTERM, as Kubernetes stops a pod
on scale-down or rollout) while streams run on it loses none of them.

One prefill and two decode engine processes behind a router (static discovery: the router
learns of the drain from the pod's own health, as in local mode). While 8 streams are in
flight, the decode engine carrying some of them gets SIGTERM: it must refuse nothing already
running, finish every stream with all its tokens, send new requests elsewhere, then exit 0.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import httpx
import openai
import pytest

from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
TOKENS = 128
STREAMS = 8
ENGINE_FLAGS = ("--dtype", "float32", "--max-model-len", "1024", "--drain-seconds", "120")


def carrying(address: str) -> int:
    """Requests the engine holds now (running or queued)."""
    with grpc.insecure_channel(address) as channel:
        stats = pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=5)
    return stats.num_requests_running + stats.num_requests_waiting


def wait_decode_pods(url: str, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=5).json()
        if health["decode_pods"] == n:
            return
        assert time.monotonic() < deadline, f"router never saw {n} decode pods: {health}"
        time.sleep(0.1)


def stream_all(url: str, prompt: str, first_token: concurrent.futures.Future | None = None):
    """One streamed completion: (text pieces, finish reason, completion tokens in usage)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    pieces, finish, usage = [], None, None
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.text:
                pieces.append(choice.text)
                if first_token is not None and not first_token.done():
                    first_token.set_result(True)
            finish = choice.finish_reason or finish
    return pieces, finish, usage


def test_sigterm_on_a_decode_pod_finishes_its_streams(engine_factory, router_factory):
    _, prefill, _ = engine_factory("prefill", *ENGINE_FLAGS, "--lease-seconds", "60")
    engine_a, decode_a, _ = engine_factory("decode", *ENGINE_FLAGS)
    engine_b, decode_b, _ = engine_factory("decode", *ENGINE_FLAGS)
    router = router_factory([
        "--prefill-endpoints", prefill, "--decode-endpoints", f"{decode_a},{decode_b}",
        "--policy", "least_load", "--stats-interval", "0.2",
    ])  # fmt: skip
    wait_decode_pods(router.url, 2)
    prompts = [f"Count slowly from {i} to a thousand:" for i in range(STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(STREAMS + 4) as pool:
        started = [concurrent.futures.Future() for _ in prompts]
        streams = [
            pool.submit(stream_all, router.url, p, f) for p, f in zip(prompts, started, strict=True)
        ]
        concurrent.futures.wait(started, timeout=300)
        assert all(f.done() for f in started), "streams never started"
        # Stop the pod carrying more streams now (least_load spreads them, but on a loaded
        # machine the first ones may have finished before the last one started).
        load = {decode_a: carrying(decode_a), decode_b: carrying(decode_b)}
        doomed = engine_a if load[decode_a] >= load[decode_b] else engine_b
        assert max(load.values()) > 0, f"no stream was running on either decode pod: {load}"
        doomed.proc.send_signal(signal.SIGTERM)
        # It drains: the router stops choosing it (its health says draining), new work goes
        # to decode_b, and the streams already on it run to their last token.
        wait_decode_pods(router.url, 1)
        late = [pool.submit(stream_all, router.url, f"Late request {i}:") for i in range(4)]
        results = [f.result(timeout=600) for f in streams + late]
    for pieces, finish, usage in results:
        assert finish == "length"
        assert usage == TOKENS, "a stream lost tokens"
        assert pieces, "a stream carried no text"
    assert doomed.proc.wait(120) == 0
