"""The operator's autoscaler reads real engines: `splitserve serve` under streaming load, scraped
by the operator's own reader (as it scrapes pods), gives the numbers its decisions use.

This is what ties the autoscaler's metric names to what the engine and router processes really
export (the kopf and in-memory tests serve metrics from the same classes, not from processes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from urllib.parse import urlparse

import httpx
import pytest

from splitserve.operator import labels as L
from splitserve.operator.autoscale import decide
from splitserve.operator.autoscale.config import RoleAutoscaling, Targets
from splitserve.operator.autoscale.scrape import MetricsReader
from splitserve.operator.autoscale.signals import RouterSignals, role_signals, router_signals

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
STREAMS = 4


def pod(name: str, role: str, port: int, port_name: str = "metrics") -> dict:
    """A pod object as the operator lists it, for a process on 127.0.0.1."""
    return {
        "metadata": {"name": name, "labels": {L.ROLE_LABEL: role}},
        "spec": {"containers": [{"ports": [{"name": port_name, "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }


def stream(url: str, k: int) -> int:
    body = {"model": MODEL, "prompt": f"Count from {k}:", "max_tokens": 96, "stream": True,
            "ignore_eos": True}  # fmt: skip
    n = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            n += line.startswith("data: {")
    return n


def test_the_autoscaler_reads_real_engines(serve_factory) -> None:
    stack = serve_factory(["--prefill-replicas", "1", "--decode-replicas", "1"])
    try:
        pods = [
            pod(name, L.PREFILL if name.startswith("prefill") else L.DECODE, metrics)
            for name, (_, metrics) in stack.engines.items()
        ]
        pods.append(pod("router", L.ROUTER, urlparse(stack.url).port, "http"))
        assert {p["metadata"]["labels"][L.ROLE_LABEL] for p in pods} == {
            L.PREFILL, L.DECODE, L.ROUTER
        }  # fmt: skip

        async def observe():
            reader = MetricsReader()
            try:
                return await reader.observe(pods)
            finally:
                await reader.close()

        before = asyncio.run(observe())
        assert [s.pod for s in before.routers] == ["router"]
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as ex:
            streams = [ex.submit(stream, stack.url, k) for k in range(STREAMS)]
            deadline = time.monotonic() + 300
            while True:  # until the decode engine runs them all (they are long)
                during = asyncio.run(observe())
                (decode,) = during.engines[L.DECODE]
                if decode.running >= STREAMS:
                    break
                assert time.monotonic() < deadline, f"decode never ran {STREAMS}: {decode}"
                time.sleep(0.2)
            assert all(f.result(300) > 0 for f in streams)
        after = asyncio.run(observe())
    finally:
        assert stack.stop() == 0
    previous = {s.pod: s for s in during.engines[L.DECODE]}
    signals = role_signals(after.engines[L.DECODE], previous)
    # Tokens were generated between the two scrapes: an inter-token latency over the interval.
    assert signals.itl_p90 is not None and signals.itl_p90 > 0
    busy = role_signals(during.engines[L.DECODE], {})
    assert busy.running >= STREAMS and 0 < busy.kv_usage <= 1
    cfg = RoleAutoscaling(1, 8, Targets(concurrency=2))
    rec = decide.recommend(cfg, 1, busy, RouterSignals())
    assert rec.replicas == 2 and "running 4.00/pod vs target 2" in rec.why
    prefill = role_signals(during.engines[L.PREFILL], {})
    assert prefill.pods == 1
    # No request waited for a cold start here: the router's queue reads empty.
    assert router_signals(after.routers, 0.0) == RouterSignals()
