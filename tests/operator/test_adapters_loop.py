"""spec.adapters through the real kopf loop (kmock's emulator) and a real engine process.

The operator writes the adapter list ConfigMap; this test plays the kubelet (it copies the
ConfigMap's file into the engine's watched file, as a ConfigMap volume refresh does) and stands a
Pod object in the emulator for a real colocated engine on the tiny Llama. Adding and removing
adapters in the spec then loads and unloads them in that running engine, the engine Deployment's
pod template never changes (no restart), and status reports what the pod has loaded, as the
operator learned it from the engine's own GetInfo.
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path

import pytest
from test_kopf_loop import (
    ISVC,
    ISVC_PATH,
    NS,
    Cluster,
    condition,
    eventually,
    running_operator,
)

from splitserve.operator import labels as L
from splitserve.processes import free_port, spawn, splitserve_argv
from splitserve.processes import stop as stop_processes

pytestmark = [pytest.mark.timeout(300), pytest.mark.model]


@pytest.fixture
def engine(tmp_path, tiny_llama_dir):
    """A colocated decode engine with LoRA, watching ``adapters.json`` (absent at first)."""
    watched = tmp_path / "adapters.json"
    port = free_port()
    argv = splitserve_argv(
        "decode", "--colocated", "--model", str(tiny_llama_dir), "--dtype", "float32",
        "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "64",
        "--block-size", "8", "--enable-lora", "--max-loras", "2",
        "--lora-modules-file", str(watched),
    )  # fmt: skip
    log = (tmp_path / "engine.log").open("w")
    proc = spawn(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), output=log)
    yield port, watched, tmp_path / "engine.log"
    stop_processes([proc], 20)


async def kubelet(cluster: Cluster, watched: Path) -> None:
    """Refresh the engine's mounted file from the adapters ConfigMap, as the kubelet does."""
    while True:
        cm = cluster.get("configmaps", "chat-adapters")
        if cm is not None:
            text = cm["data"]["adapters.json"]
            if not watched.exists() or watched.read_text() != text:
                watched.write_text(text)
        await asyncio.sleep(0.1)


def engine_pod(port: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "chat-decode-0",
            "namespace": NS,
            "labels": {L.INSTANCE_LABEL: "chat", L.MANAGED_BY_LABEL: L.MANAGED_BY,
                       L.ROLE_LABEL: L.DECODE},
        },
        "spec": {"containers": [{"name": "engine", "image": "x",
                                 "ports": [{"name": "grpc", "containerPort": port}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


async def test_spec_adapters_load_and_unload_in_a_running_engine(engine, tiny_llama_adapters):
    port, watched, log = engine
    adapter = lambda name: {"name": name, "uri": f"file://{tiny_llama_adapters[name]}"}  # noqa: E731
    isvc = copy.deepcopy(ISVC)
    isvc["spec"]["prefill"] = {"replicas": 0}  # colocated: decode pods only
    isvc["spec"]["decode"] = {"replicas": 1}
    isvc["spec"]["adapters"] = [adapter("qv")]
    async with running_operator({"v1/pods": ("Pod", True)}) as cluster:
        feeder = asyncio.create_task(kubelet(cluster, watched))
        try:
            await cluster.call("POST", ISVC_PATH, isvc)
            await cluster.call("POST", f"/api/v1/namespaces/{NS}/pods", engine_pod(port))

            def loaded(names: list[str]):
                i = cluster.get("inferenceservices", "chat")
                status = (i or {}).get("status") or {}
                got = (status.get("loadedAdapters") or {}).get("decode")
                return got == names and condition(i, "AdaptersLoaded") == "True" and i

            isvc_now = await eventually(lambda: loaded(["qv"]), "qv loaded (engine start + load)",
                                        timeout=180)  # fmt: skip
            assert isvc_now["status"]["adapters"] == [
                {"name": "qv", "decode": "1/1", "loaded": True}
            ]
            (dep,) = [d for d in cluster.objects("deployments")
                      if d["metadata"]["labels"][L.ROLE_LABEL] == L.DECODE]  # fmt: skip
            template = dep["spec"]["template"]

            patch = {"metadata": {"generation": 2},
                     "spec": {"adapters": [adapter("qv"), adapter("mlp")]}}  # fmt: skip
            await cluster.call("PATCH", f"{ISVC_PATH}/chat", patch)
            await eventually(lambda: loaded(["mlp", "qv"]), "mlp loaded beside qv", timeout=60)

            patch = {"metadata": {"generation": 3}, "spec": {"adapters": [adapter("mlp")]}}
            await cluster.call("PATCH", f"{ISVC_PATH}/chat", patch)
            await eventually(lambda: loaded(["mlp"]), "qv unloaded", timeout=60)

            (dep,) = [d for d in cluster.objects("deployments")
                      if d["metadata"]["labels"][L.ROLE_LABEL] == L.DECODE]  # fmt: skip
            assert dep["spec"]["template"] == template, "adapters must never roll the pods"
        finally:
            feeder.cancel()
    text = log.read_text()
    assert "LoRA adapter qv loaded" in text and "LoRA adapter qv unloaded" in text
