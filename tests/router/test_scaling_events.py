"""The router through scale events, against fake pods: a pod that starts draining keeps its
streams and gets no new work; with no pod at all, requests wait (bounded) for one to start.

Discovery here is driven by the test (``Discovery.set``), the way the Kubernetes watch drives
it: a terminating EndpointSlice endpoint arrives as an ``Endpoint`` with ``draining=True``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from splitserve.services.router.cold_start import ColdStartConfig
from splitserve.services.router.main import RouterSettings, build_router
from splitserve.services.router.pool import DECODE, PREFILL, Endpoint, Pool


def _router_thread(app):
    """A router in a thread, with this folder's conftest helper (as pytest loaded it)."""
    here = str(Path(__file__).with_name("conftest.py"))
    cf = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == here)
    return cf.RouterThread(app)


class Discovery:
    """Endpoints set from the test thread onto the router's loop."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints
        self.pool: Pool | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, pool: Pool) -> None:
        self.pool, self.loop = pool, asyncio.get_running_loop()
        pool.set_endpoints(self.endpoints)
        await asyncio.Event().wait()

    def set(self, endpoints: list[Endpoint]) -> None:
        _wait(lambda: self.loop is not None)  # the router's lifespan started discovery
        assert self.loop is not None and self.pool is not None
        self.endpoints = endpoints
        self.loop.call_soon_threadsafe(self.pool.set_endpoints, endpoints)


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _health(url: str) -> tuple[int, dict]:
    r = httpx.get(url + "/health", timeout=5)
    return r.status_code, r.json()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def router_over(fake_pods):
    """``router_over(roles, settings) -> (router, pods, discovery)``; stopped after the test."""
    made: list = []

    def make(roles: list[str], settings: RouterSettings | None = None, **engine_kw):
        pods = fake_pods(roles, **engine_kw)
        endpoints = [
            Endpoint(p.address, frozenset({PREFILL} if p.engine.role == PREFILL else {DECODE}))
            for p in pods
        ]
        disco = Discovery(endpoints)
        settings = settings or RouterSettings(served_names=("m",), stats_interval_s=0.1)
        router = _router_thread(build_router(settings, disco))
        made.append(router)
        return router, pods, disco

    yield make
    for router in made:
        router.stop()


def test_a_draining_decode_pod_keeps_its_stream_and_gets_no_new_work(router_over):
    router, (pre, dec_a, dec_b), disco = router_over(
        ["prefill", "decode", "decode"], token_delay_s=0.05
    )
    router.wait_ready()
    _wait(lambda: _health(router.url)[1]["decode_pods"] == 2)
    body = {"model": "m", "prompt": "long", "max_tokens": 40, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
        busy = dec_a if dec_a.engine.generates else dec_b
        idle = dec_b if busy is dec_a else dec_a
        # The busy pod is deleted: its endpoint turns terminating (draining).
        disco.set([
            disco.endpoints[0],
            Endpoint(busy.address, frozenset({DECODE}), draining=True),
            Endpoint(idle.address, frozenset({DECODE})),
        ])  # fmt: skip
        _wait(lambda: _health(router.url)[1]["decode_pods"] == 1)
        # New work goes to the other pod, while the stream goes on.
        c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        for k in range(3):
            assert c.completions.create(model="m", prompt=f"new {k}", max_tokens=2).choices
        assert len(busy.engine.generates) == 1 and len(idle.engine.generates) == 3
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in rest[:-1] if json.loads(e)["choices"]]
    assert len(texts) + 1 == 40  # every token of the stream arrived
    assert len(pre.engine.prefills) == 4


def test_a_stream_on_a_draining_pod_is_aborted_there_when_its_client_leaves(router_over):
    router, (_, dec), disco = router_over(["prefill", "decode"], token_delay_s=0.05)
    router.wait_ready()
    body = {"model": "m", "prompt": "long", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
        disco.set([disco.endpoints[0], Endpoint(dec.address, frozenset({DECODE}), draining=True)])
        _wait(lambda: _health(router.url)[1]["decode_pods"] == 0)  # the router saw the drain
    # The client left mid-stream: the router still reaches the draining pod to stop the work.
    _wait(lambda: dec.engine.aborted)


def _cold_settings(timeout_s: float, max_waiting: int = 8) -> RouterSettings:
    return RouterSettings(
        served_names=("m",),
        stats_interval_s=0.1,
        cold_start=ColdStartConfig(timeout_s=timeout_s, max_waiting=max_waiting),
    )


def test_a_request_waits_for_the_first_pod_to_start(router_over):
    router, pods, disco = router_over(["prefill", "decode"], _cold_settings(60))
    started = disco.endpoints
    disco.set([])  # scaled to zero
    _wait(lambda: _health(router.url)[1]["decode_pods"] == 0)
    status, body = _health(router.url)
    assert (status, body["status"]) == (200, "idle")  # ready: it holds requests
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=90)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        waiting = ex.submit(c.completions.create, model="m", prompt="wake up", max_tokens=3)
        _wait(lambda: _metric(router.url, "splitserve_router_cold_start_waiting") == 1)
        assert not waiting.done()
        disco.set(started)  # a pod started
        answer = waiting.result(60)
    assert answer.choices[0].finish_reason == "length"
    assert pods[1].engine.generates
    assert _metric(router.url, "splitserve_router_cold_start_waiting") == 0
    served = 'splitserve_router_cold_start_requests_total{outcome="served"}'
    assert _metric(router.url, served) == 1


def test_cold_start_timeout_and_a_full_queue_are_openai_503s(router_over):
    router, _, disco = router_over(["prefill", "decode"], _cold_settings(1.5, max_waiting=1))
    disco.set([])
    _wait(lambda: _health(router.url)[1]["decode_pods"] == 0)
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        first = ex.submit(c.completions.create, model="m", prompt="a", max_tokens=2)
        _wait(lambda: _metric(router.url, "splitserve_router_cold_start_waiting") == 1)
        with pytest.raises(openai.APIStatusError) as full:
            c.completions.create(model="m", prompt="b", max_tokens=2)
        with pytest.raises(openai.APIStatusError) as timed_out:
            first.result(30)
    for err, words in ((full.value, "already wait"), (timed_out.value, "after waiting")):
        assert err.status_code == 503
        assert err.body["type"] == "service_unavailable_error"
        assert err.body["code"] == "no_backend" and words in err.body["message"]
        assert err.response.headers["retry-after"]
    outcomes = httpx.get(router.url + "/metrics").text
    assert 'outcome="timeout"} 1.0' in outcomes and 'outcome="rejected"} 1.0' in outcomes


def test_without_cold_start_holding_no_pod_is_an_immediate_503(router_over):
    router, _, disco = router_over(["prefill", "decode"])
    router.wait_ready()
    disco.set([])
    _wait(lambda: _health(router.url)[0] == 503)
    assert _health(router.url)[1]["status"] == "unavailable"
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        c.completions.create(model="m", prompt="a", max_tokens=2)
    assert err.value.status_code == 503


@pytest.mark.parametrize("transition_s", [15.0, 0.0])
def test_a_rollout_gap_holds_requests_without_cold_start(router_over, transition_s):
    # A rollout: the old decode pod drains before this router has learned the new one (its
    # watch and first poll lag Kubernetes). Without cold-start holding, a request in that gap
    # waits for the new pod (up to the change-over hold) instead of getting a 503.
    settings = RouterSettings(
        served_names=("m",), stats_interval_s=0.1,
        cold_start=ColdStartConfig(transition_s=transition_s),
    )  # fmt: skip
    router, (pre, old, new), disco = router_over(["prefill", "decode", "decode"], settings)
    pre_ep, old_ep, new_ep = (
        Endpoint(p.address, frozenset({PREFILL} if p is pre else {DECODE})) for p in (pre, old, new)
    )
    disco.set([pre_ep, old_ep])
    router.wait_ready()
    _wait(lambda: _health(router.url)[1]["decode_pods"] == 1)
    disco.set([pre_ep, Endpoint(old.address, frozenset({DECODE}), draining=True)])
    _wait(lambda: _health(router.url)[1]["decode_pods"] == 0)  # no ready pair now
    # Holding for the new pods, the router stays in its Service (ready); without the hold it
    # says it cannot serve.
    expected = (200, "idle") if transition_s else (503, "unavailable")
    status, body = _health(router.url)
    assert (status, body["status"]) == expected
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=30)
    if not transition_s:
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="m", prompt="a", max_tokens=2)
        assert err.value.status_code == 503
        return
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        held = ex.submit(c.completions.create, model="m", prompt="a", max_tokens=3)
        time.sleep(0.5)  # the request is in the router by now (it would have failed at once)
        assert not held.done()
        disco.set([pre_ep, Endpoint(old.address, frozenset({DECODE}), draining=True), new_ep])
        answer = held.result(30)
    assert answer.choices[0].finish_reason == "length"
    assert new.engine.generates and not old.engine.generates
    # A change-over is not a cold start: the scale-from-zero signal did not move.
    assert _metric(router.url, 'splitserve_router_cold_start_requests_total{outcome="served"}') == 0
