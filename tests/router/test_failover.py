"""Pod failures and client disconnects, against fake pods that fail on command."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from splitserve.proto import splitserve_pb2 as pb
from splitserve.services.router.engine_client import EngineClient
from splitserve.services.router.errors import BackendError
from splitserve.services.router.main import RouterSettings


def _settings(**kw) -> RouterSettings:
    return RouterSettings(served_names=("m",), stats_interval_s=0.1, **kw)


def test_non_streaming_mid_request_failure_is_retried_elsewhere(stack_factory):
    with stack_factory(["colocated", "colocated"], _settings()) as (router, pods):
        bad, good = pods
        bad.engine.fail_after_tokens = 3  # dies after streaming 3 tokens
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        for k in range(4):
            r = c.completions.create(model="m", prompt=f"request {k}", max_tokens=6)
            assert r.choices[0].finish_reason == "length"
            assert r.choices[0].text.count(" w") == 6
            assert r.usage.completion_tokens == 6
        assert bad.engine.generates, "the failing pod was never tried: the test proves nothing"
        assert len(good.engine.generates) == 4
        metrics = httpx.get(router.url + "/metrics").text
        assert "splitserve_router_retries_total" in metrics


def test_prefill_failure_is_retried_on_another_prefill_pod(stack_factory):
    with stack_factory(["prefill", "prefill", "decode"], _settings()) as (router, pods):
        pods[0].engine.fail_prefill = True
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        for k in range(3):
            assert c.completions.create(model="m", prompt=f"p{k}", max_tokens=2).choices[0].text
        assert pods[0].engine.prefills and len(pods[1].engine.prefills) == 3


def test_stream_failure_before_first_token_is_retried(stack_factory):
    with stack_factory(["colocated", "colocated"], _settings()) as (router, pods):
        pods[0].engine.fail_after_tokens = 0
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        for k in range(3):
            chunks = list(
                c.completions.create(model="m", prompt=f"s{k}", max_tokens=3, stream=True)
            )
            assert "".join(ch.choices[0].text for ch in chunks).count(" w") == 3


def test_stream_failure_after_tokens_ends_with_error_event(stack_factory):
    with stack_factory(["colocated"], _settings()) as (router, (pod,)):
        pod.engine.fail_after_tokens = 2
        body = {"model": "m", "prompt": "x", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        texts = [p["choices"][0]["text"] for p in payloads if "choices" in p]
        assert len(texts) == 2  # the tokens that were sent ...
        assert "error" in payloads[-1]  # ... then an explicit error, never a silent truncation
        assert payloads[-1]["error"]["type"] == "server_error"
        # The SDK turns that event into an exception.
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            list(c.completions.create(model="m", prompt="y", max_tokens=8, stream=True))


def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_streaming_client_disconnect_aborts_on_the_pod(stack_factory):
    with stack_factory(["prefill", "decode"], _settings(), token_delay_s=0.1) as (router, pods):
        decode = pods[1].engine
        body = {"model": "m", "prompt": "long", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(g.startswith("data: ") for g in got)
        _wait(lambda: decode.aborted and decode.cancelled)
        assert decode.aborted[-1] == decode.generates[-1]
        assert decode.running == 0


def test_non_streaming_client_disconnect_aborts_on_the_pod(stack_factory):
    with stack_factory(["colocated"], _settings(), token_delay_s=0.1) as (router, (pod,)):
        body = {"model": "m", "prompt": "long", "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(router.url + "/v1/completions", json=body, timeout=0.5)
        _wait(lambda: pod.engine.aborted and pod.engine.running == 0)
        assert pod.engine.aborted[-1] == pod.engine.generates[-1]


def test_calls_on_a_pod_that_left_the_pool_are_retryable_failures(fake_pods, grpc_loop):
    """A request routed to a pod that leaves the endpoint set before its call goes out finds the
    channel closed by the pool: that must be a retryable BackendError (the dispatcher then tries
    another pod), never an unexpected exception (a 500; seen in the end-to-end rollout test)."""
    (pod,) = fake_pods(["colocated"])

    async def scenario() -> None:
        client = EngineClient(pod.address)
        assert (await client.stats()).epoch  # the channel works ...
        await client.close(grace=5.0)  # ... then the pool closes it, as when the pod leaves
        with pytest.raises(BackendError) as err:
            client.generate(pb.GenerateRequest())
        assert err.value.retryable and err.value.pod == pod.address
        for call in (client.prefill(pb.PrefillRequest(), 1.0), client.stats(), client.info()):
            with pytest.raises(BackendError) as err:
                await call
            assert err.value.retryable
        assert await client.abort(["r"]) == 0 and await client.abort_prefill(["r"]) == 0

    grpc_loop.call(scenario())


def test_calls_in_flight_when_the_pool_closes_the_channel_are_retryable(fake_pods, grpc_loop):
    """A pod killed mid-request leaves the pool, which closes its channel under calls still in
    flight; grpc.aio then raises CancelledError in the caller. That is the pod's failure (a
    retryable BackendError), not the client going away (seen as a 500 in the prefill-kill
    end-to-end scenario); a real cancellation of the caller still propagates."""
    (pod,) = fake_pods(["colocated"], token_delay_s=0.5)

    async def scenario() -> None:
        client = EngineClient(pod.address)
        call = client.generate(pb.GenerateRequest())
        stream = client.iterate(call)
        await stream.__anext__()  # the stream is flowing ...
        closing = asyncio.get_running_loop().call_later(0.1, asyncio.ensure_future,
                                                        client.close(grace=None))  # fmt: skip
        with pytest.raises(BackendError) as err:
            async for _ in stream:
                pass
        assert err.value.retryable and err.value.pod == pod.address
        closing.cancel()

        other = EngineClient(pod.address)
        task = asyncio.ensure_future(_drain(other.iterate(other.generate(pb.GenerateRequest()))))
        await asyncio.sleep(0.3)
        task.cancel()  # the caller itself is cancelled: that must stay a cancellation
        with pytest.raises(asyncio.CancelledError):
            await task
        await other.close(grace=None)

    grpc_loop.call(scenario())


async def _drain(stream) -> None:
    async for _ in stream:
        pass
