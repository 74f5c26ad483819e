"""The autoscaler in the real kopf loop, against kmock's emulator, with pods that serve real
engine metrics over HTTP: the decode pool grows on load, the drift timer never undoes it,
and it shrinks when the load is gone, the least-loaded pod marked to go first.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from test_autoscale import Engine
from test_kopf_loop import ISVC, ISVC_PATH, NS, eventually, running_operator

from splitserve.operator import labels as L
from splitserve.operator.autoscale.cost import DELETION_COST_ANNOTATION
from splitserve.processes import free_port
from splitserve.services.common.metrics import EngineMetrics

pytestmark = pytest.mark.timeout(120)

AUTOSCALED = copy.deepcopy(ISVC)
AUTOSCALED["spec"]["decode"] = {
    "replicas": 1,
    "autoscaling": {
        "minReplicas": 1, "maxReplicas": 4, "targets": {"concurrency": 2},
        "scaleDown": {"stabilizationSeconds": 0, "maxPodsPerStep": 4},
    },
}  # fmt: skip


def pod(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {L.INSTANCE_LABEL: "chat", L.MANAGED_BY_LABEL: L.MANAGED_BY,
                       L.ROLE_LABEL: L.DECODE},
        },  # fmt: skip
        "spec": {"containers": [{"name": "engine",
                                 "ports": [{"name": "metrics", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


async def test_the_decode_pool_follows_its_load() -> None:
    engines: dict[str, Engine] = {}
    servers = []
    try:
        async with running_operator({"v1/pods": ("Pod", True)}, autoscale_interval=0.3) as cluster:

            async def add_pod(name: str, **load: Any) -> None:
                engines[name] = Engine(**load)
                registry = CollectorRegistry()
                EngineMetrics(registry, engines[name], "m", L.DECODE, name)
                port = free_port()
                server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
                servers.append(server)
                await cluster.call("POST", f"/api/v1/namespaces/{NS}/pods", pod(name, port))

            def decode_replicas() -> int | None:
                for d in cluster.objects("deployments"):
                    if d["metadata"]["labels"][L.ROLE_LABEL] == L.DECODE:
                        return d["spec"]["replicas"]
                return None

            await add_pod("d0", running=7)
            await cluster.call("POST", ISVC_PATH, AUTOSCALED)
            await eventually(lambda: decode_replicas() == 4, "decode scaled up to 4")
            isvc = cluster.get("inferenceservices", "chat")
            assert isvc is not None
            auto = await eventually(
                lambda: (
                    ((cluster.get("inferenceservices", "chat") or {}).get("status") or {})
                    .get("autoscaling", {})
                    .get(L.DECODE)
                ),
                "status.autoscaling.decode",
            )
            assert auto["replicas"] == 4 and auto["reason"] == "ScaledUp"
            assert "running 7.00/pod vs target 2" in auto["message"]
            # The drift timer runs every 0.3 s too: it must keep the autoscaler's size.
            for _ in range(10):
                assert decode_replicas() == 4
                await asyncio.sleep(0.1)
            # Two more pods report (one with a request), then the load on d0 ends.
            await add_pod("d1", running=1)
            await add_pod("d2")
            await asyncio.sleep(1.0)  # a few passes see all three (8 requests: still 4 pods)
            assert decode_replicas() == 4
            engines["d0"].running = 0
            await eventually(lambda: decode_replicas() == 1, "decode scaled down to 1")
            costs = {
                name: int(cluster.get("pods", name)["metadata"]["annotations"][
                    DELETION_COST_ANNOTATION
                ])
                for name in ("d0", "d1", "d2")
            }  # fmt: skip
            assert costs["d1"] > max(costs["d0"], costs["d2"])
            reasons = await eventually(
                lambda: (
                    (r := [e.get("reason") for e in cluster.objects("events")])
                    and "ScaledDown" in r
                    and r
                ),
                "a ScaledDown event",
            )
            # One event per change (the timers never repeat one from a stale status).
            assert reasons.count("ScaledUp") == 1 and reasons.count("RolloutComplete") == 1
    finally:
        for server in servers:
            server.shutdown()
