"""One autoscaling pass against an in-memory API with pods that really serve ``/metrics``:
the engine pods' metrics come from the engine servers' own ``EngineMetrics``, the router's from
``RouterMetrics``, served over HTTP and scraped the way the operator scrapes a cluster.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from test_autoscale import Engine
from test_reconcile import FakeApi

from splitserve.operator import labels as L
from splitserve.operator.autoscale.cost import DELETION_COST_ANNOTATION
from splitserve.operator.autoscale.runner import autoscale_pass
from splitserve.operator.autoscale.scrape import MetricsReader
from splitserve.operator.kube import KindInfo
from splitserve.processes import free_port
from splitserve.services.common.metrics import EngineMetrics
from splitserve.services.router.metrics import RouterMetrics

ISO = "2026-01-01T00:00:00Z"


class Api(FakeApi):
    """The reconcile tests' fake API, plus the merge patch the autoscaler sends to pods."""

    async def annotate(self, info: KindInfo, namespace: str, name: str, annotations) -> bool:
        obj = self.store.get((info.kind, namespace, name))
        if obj is None:
            return False
        obj["metadata"].setdefault("annotations", {}).update(annotations)
        return True


class Pods:
    """Pods whose metrics endpoints are real HTTP servers on 127.0.0.1."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.engines: dict[str, Engine] = {}
        self.router = RouterMetrics()
        self.servers: list = []

    def _serve(self, registry) -> int:
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        self.servers.append(server)
        return port

    def _store(self, name: str, role: str, port_name: str, port: int, ready: bool = True):
        self.api.store[("Pod", "ml", name)] = {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "namespace": "ml",
                "labels": {L.INSTANCE_LABEL: "chat", L.MANAGED_BY_LABEL: L.MANAGED_BY,
                           L.ROLE_LABEL: role},
            },  # fmt: skip
            "spec": {"containers": [{"name": "c", "ports": [{"name": port_name,
                                                              "containerPort": port}]}]},
            "status": {
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }  # fmt: skip

    def engine(self, name: str, role: str, ready: bool = True, **load: Any) -> Engine:
        engine = Engine(**load)
        registry = CollectorRegistry()
        EngineMetrics(registry, engine, "m", role, name)
        self.engines[name] = engine
        self._store(name, role, "metrics", self._serve(registry), ready)
        return engine

    def router_pod(self) -> None:
        self._store("router-0", L.ROUTER, "http", self._serve(self.router.registry))

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()


@pytest.fixture
def pods() -> Iterator[Pods]:
    p = Pods(Api())
    yield p
    p.close()


def body_of(make_isvc, status: dict | None = None) -> dict:
    body = make_isvc({
        "decode": {"replicas": 1, "autoscaling": {
            "minReplicas": 0, "maxReplicas": 4, "targets": {"concurrency": 2},
            "scaleDown": {"stabilizationSeconds": 0, "maxPodsPerStep": 4}}},
    })  # fmt: skip
    body["status"] = copy.deepcopy(status or {})
    return body


def decode_deployment(api: Api) -> dict:
    (dep,) = [d for d in api.by_role(L.DECODE)]
    return dep


async def test_a_pass_scales_on_real_metrics_and_records_why(make_isvc, pods) -> None:
    reader = MetricsReader()
    try:
        pods.engine("d0", L.DECODE, running=5)
        pods.engine("p0", L.PREFILL)
        pods.engine("d-starting", L.DECODE, ready=False, running=99)  # not ready: not read
        pods.router_pod()
        body = body_of(make_isvc)
        done = await autoscale_pass(pods.api, reader, body, None, 0.0, ISO)
        assert done.result is not None and done.state is not None
        # ceil(5 / 2): the pod that is not ready yet (99 requests?) is not read
        assert decode_deployment(pods.api)["spec"]["replicas"] == 3
        auto = done.result.status["autoscaling"][L.DECODE]
        assert auto["replicas"] == 3 and auto["reason"] == "ScaledUp"
        assert "running 5.00/pod vs target 2" in auto["message"]
        events = [(e.reason, e.message) for e in done.result.events]
        assert ("ScaledUp", auto["message"]) in events
        # Nothing changed: no pass result (no status write), the memory goes on.
        body["status"] = done.result.status
        again = await autoscale_pass(pods.api, reader, body, done.state, 1.0, ISO)
        assert again.result is None and again.state is not None
        # Load gone: down (window 0 here); pods are marked, the least-loaded first.
        pods.engines["d0"].running = 0
        for name in ("d1", "d2"):
            pods.engine(name, L.DECODE, running=1 if name == "d1" else 0)
        down = await autoscale_pass(pods.api, reader, body, again.state, 2.0, ISO)
        assert down.result is not None
        assert decode_deployment(pods.api)["spec"]["replicas"] == 1
        costs = {
            name: pods.api.store[("Pod", "ml", name)]["metadata"]["annotations"][
                DELETION_COST_ANNOTATION
            ]
            for name in ("d0", "d1", "d2")
        }
        assert int(costs["d1"]) > int(costs["d0"]) and int(costs["d1"]) > int(costs["d2"])
    finally:
        await reader.close()


async def test_requests_held_at_the_router_wake_a_pool_at_zero(make_isvc, pods) -> None:
    reader = MetricsReader()
    try:
        pods.engine("p0", L.PREFILL)
        pods.router_pod()
        body = body_of(make_isvc, {"autoscaling": {L.DECODE: {"replicas": 0}}})
        quiet = await autoscale_pass(pods.api, reader, body, None, 0.0, ISO)
        assert quiet.result is None  # at zero, nothing waits: stays at zero
        pods.router.cold_start_waiting.set(2)
        pods.router.cold_start_requests.labels("served").inc(0)
        woken = await autoscale_pass(pods.api, reader, body, quiet.state, 1.0, ISO)
        assert woken.result is not None
        assert decode_deployment(pods.api)["spec"]["replicas"] == 1
        (event,) = [e for e in woken.result.events if e.reason == "ScaledFromZero"]
        assert "2 requests wait at the router" in event.message
    finally:
        await reader.close()
