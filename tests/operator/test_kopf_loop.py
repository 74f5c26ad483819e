"""The real kopf loop over HTTP against kmock's in-memory Kubernetes emulator.

kmock stores objects as given (no schema, no garbage collection, no controllers), so a tiny
fake Deployment controller here writes Deployment statuses; everything else is the operator's.
Each wait is bounded, and the operator is stopped through its stop flag, so the test ends by
itself even when an assertion fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest

from splitserve.operator import labels as L
from splitserve.operator.handlers import make_registry

pytestmark = pytest.mark.timeout(120)

NS = "ml"
ISVC_PATH = f"/apis/serving.splitserve.io/v1alpha1/namespaces/{NS}/inferenceservices"
RESOURCES = {
    # kopf starts watching only once discovery lists CRDs and namespaces.
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False),
    "v1/namespaces": ("Namespace", False),
    "v1/events": ("Event", True),
    "serving.splitserve.io/v1alpha1/inferenceservices": ("InferenceService", True),
    "apps/v1/deployments": ("Deployment", True),
    "v1/services": ("Service", True),
    "v1/configmaps": ("ConfigMap", True),
    "v1/serviceaccounts": ("ServiceAccount", True),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
ISVC = {
    "apiVersion": "serving.splitserve.io/v1alpha1",
    "kind": "InferenceService",
    # kopf's JSON patches test resourceVersion, which kmock keeps but never sets.
    "metadata": {
        "name": "chat",
        "namespace": NS,
        "uid": "uid-chat-1",
        "generation": 1,
        "resourceVersion": "1",
    },
    "spec": {
        "model": {"uri": "pvc://models/smollm2", "revision": "v1"},
        "image": "registry.example/splitserve:0.1.0",
        "prefill": {"replicas": 1},
        "decode": {"replicas": 2},
        "rollout": {"maxSurge": 1, "maxUnavailable": 0},
    },
}


class Emulator(kmock.KubernetesEmulator):
    """Two API-server habits kmock lacks, which the operator relies on.

    Objects created with ``generateName`` (kopf's Events) get a name; a Deployment's
    ``metadata.generation`` grows when its spec changes (the operator compares it with
    ``status.observedGeneration`` to know whether the controller has seen a new template).
    """

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data if isinstance(request.data, dict) else None
        meta = (data or {}).setdefault("metadata", {}) if data is not None else {}
        if (
            request.method == kmock.method.POST
            and meta.get("generateName")
            and not meta.get("name")
        ):
            meta["name"] = f"{meta['generateName']}{next(_NAMES)}"
        resource = request.resource
        if request.method == kmock.method.POST and resource and resource.plural == "deployments":
            meta["generation"] = 1
        if (
            request.method == kmock.method.PATCH
            and resource
            and resource.plural == "deployments"
            and "spec" in (data or {})
        ):
            key = (request.namespace, request.name)
            for (res, ns, name), obj in self.objects.items():
                if res.plural == "deployments" and (ns, name) == key and not obj.deleted:
                    meta["generation"] = obj.raw["metadata"].get("generation", 1) + 1
        return await super()._handle(request)


_NAMES = itertools.count()


class Cluster:
    """HTTP access to the emulator plus a switchable fake Deployment controller."""

    def __init__(self, emulator: Emulator, url: str) -> None:
        self.emulator = emulator
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession()
        self.controller_on = True

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body) as response:
            text = await response.text()
            assert response.status < 300, (method, path, response.status, text[:300])
            return await response.json(content_type=None) if text else None

    def objects(self, plural: str) -> list[dict[str, Any]]:
        out = []
        for (resource, namespace, _), obj in self.emulator.objects.items():
            if resource.plural == plural and namespace == NS and not obj.deleted:
                out.append(copy.deepcopy(obj.raw))
        return out

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        for obj in self.objects(plural):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    async def fake_deployment_controller(self) -> None:
        """Rolls every Deployment to its spec at once (kmock has no controllers)."""
        while True:
            if self.controller_on:
                for dep in self.objects("deployments"):
                    replicas = dep["spec"]["replicas"]
                    want = {"replicas": replicas, "readyReplicas": replicas}
                    want["updatedReplicas"] = replicas
                    want["observedGeneration"] = dep["metadata"]["generation"]
                    if {k: dep.get("status", {}).get(k) for k in want} != want:
                        path = (
                            f"/apis/apps/v1/namespaces/{NS}/deployments/{dep['metadata']['name']}"
                        )
                        await self.call("PATCH", path, {"status": want})
            await asyncio.sleep(0.05)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns a truthy value, or fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def condition(isvc: dict[str, Any] | None, kind: str) -> str | None:
    for cond in ((isvc or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond["status"]
    return None


@contextlib.asynccontextmanager
async def running_emulator(
    extra: dict[str, tuple[str, bool]] | None = None,
) -> AsyncIterator[Cluster]:
    """The emulator on a free port, its discovery complete (``RESOURCES`` plus ``extra``, as
    resource -> (kind, namespaced)), with the fake controller running."""
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        for resource, (kind, namespaced) in {**RESOURCES, **(extra or {})}.items():
            emulator.resources[resource] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=VERBS, subresources={"status"}
            )
        cluster = Cluster(emulator, str(server.url))
        controller = asyncio.create_task(cluster.fake_deployment_controller())
        try:
            yield cluster
        finally:
            controller.cancel()
            await cluster.session.close()


@contextlib.asynccontextmanager
async def running_operator(
    extra: dict[str, tuple[str, bool]] | None = None, **registry_options: Any
) -> AsyncIterator[Cluster]:
    """kopf.operator() in this event loop, logged in to the emulator (see running_emulator), its
    registry made with ``registry_options`` (default: a 0.3-s drift timer), stopped by its flag."""
    async with running_emulator(extra) as cluster:
        url = cluster.url
        registry = make_registry(
            lambda: kopf.ConnectionInfo(server=url, insecure=True),
            **{"interval": 0.3, **registry_options},
        )
        stop = asyncio.Event()
        operator = asyncio.create_task(
            kopf.operator(registry=registry, clusterwide=True, standalone=True, stop_flag=stop)
        )
        try:
            yield cluster
        finally:
            stop.set()
            # kopf lingers for seconds on kmock's never-ending watch streams: a short grace,
            # then wait_for cancels it.
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(operator, timeout=2)
            if not operator.done():
                operator.cancel()


async def test_operator_reconciles_rolls_out_restores_and_deletes() -> None:
    async with running_operator() as cluster:
        await cluster.call("POST", ISVC_PATH, ISVC)

        # Create: every child appears, owned by the CR, and status turns Ready.
        deps = await eventually(
            lambda: len(cluster.objects("deployments")) == 3 and cluster.objects("deployments"),
            "three deployments",
        )
        for dep in deps:
            assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-chat-1"
        assert {s["metadata"]["name"] for s in cluster.objects("services")} == {
            "chat", "chat-prefill", "chat-decode"
        }  # fmt: skip
        assert cluster.get("networkpolicies", "chat-engines") is not None
        assert len(cluster.objects("poddisruptionbudgets")) == 3
        isvc = await eventually(
            lambda: (
                condition(cluster.get("inferenceservices", "chat"), "Ready") == "True"
                and cluster.get("inferenceservices", "chat")
            ),
            "Ready=True",
        )
        first_hash = isvc["status"]["rolloutHash"]
        assert isvc["status"]["decode"]["summary"] == "2/2"
        assert isvc["status"]["url"] == "http://chat.ml.svc.cluster.local"
        assert isvc["status"]["model"] == "pvc://models/smollm2"
        assert isvc["metadata"]["finalizers"] == [f"{L.PREFIX}/finalizer"]

        # Update the model while no pod rolls: a new generation of both roles comes up beside
        # the old one, which stays (it serves until the new one is ready); status shows progress.
        cluster.controller_on = False
        patch = {"metadata": {"generation": 2}, "spec": {"model": {"revision": "v2"}}}
        await cluster.call("PATCH", f"{ISVC_PATH}/chat", patch)

        def engine_hashes() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for d in cluster.objects("deployments"):
                role = d["metadata"]["labels"][L.ROLE_LABEL]
                if role != L.ROUTER:
                    labels = d["spec"]["template"]["metadata"]["labels"]
                    out.setdefault(role, set()).add(labels[L.ROLLOUT_HASH_LABEL])
            return out

        def both_generations() -> bool:
            hashes = engine_hashes()
            return all(
                len(hashes.get(r, ())) == 2 and first_hash in hashes[r] for r in L.ENGINE_ROLES
            )

        await eventually(both_generations, "new prefill and decode beside the old generation")
        for dep in cluster.objects("deployments"):
            assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        isvc = await eventually(
            lambda: (
                condition(cluster.get("inferenceservices", "chat"), "Progressing") == "True"
                and cluster.get("inferenceservices", "chat")
            ),
            "Progressing=True during the rollout",
        )
        assert isvc["status"]["rolloutHash"] == first_hash  # still serving the old one
        assert isvc["status"]["desiredRolloutHash"] != first_hash
        assert isvc["status"]["observedGeneration"] == 2
        cluster.controller_on = True
        isvc = await eventually(
            lambda: (
                (i := cluster.get("inferenceservices", "chat"))
                and condition(i, "Ready") == "True"
                and i["status"]["rolloutHash"] != first_hash
                and i
            ),
            "rollout complete",
        )
        assert isvc["status"]["revision"] == "v2"
        new_hash = isvc["status"]["rolloutHash"]
        assert new_hash == isvc["status"]["desiredRolloutHash"]
        await eventually(
            lambda: engine_hashes() == {r: {new_hash} for r in L.ENGINE_ROLES},
            "the old generation pruned",
        )

        # Drift: a deleted child comes back, a hand scale is undone.
        decode = f"chat-decode-{new_hash}"
        await cluster.call("DELETE", f"/api/v1/namespaces/{NS}/services/chat-decode")
        await cluster.call(
            "PATCH",
            f"/apis/apps/v1/namespaces/{NS}/deployments/{decode}",
            {"spec": {"replicas": 7}},
        )
        await eventually(lambda: cluster.get("services", "chat-decode"), "service restored")
        await eventually(
            lambda: cluster.get("deployments", decode)["spec"]["replicas"] == 2,
            "replicas restored",
        )

        # Events were posted for what the operator did.
        reasons = {e.get("reason") for e in cluster.objects("events")}
        assert {"Applied", "RolloutStarted", "RolloutComplete"} <= reasons

        # Delete: the finalizer lets the operator remove the children, then the CR goes.
        await cluster.call("DELETE", f"{ISVC_PATH}/chat")
        await eventually(
            lambda: not cluster.objects("deployments") and not cluster.objects("services"),
            "children deleted",
        )
        await eventually(
            lambda: cluster.get("inferenceservices", "chat") is None, "InferenceService gone"
        )


async def test_cli_run_uses_the_kubeconfig(tmp_path) -> None:
    """`splitserve operator run` as users start it: a child process reading KUBECONFIG."""
    async with running_emulator() as cluster:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: kmock, cluster: {{server: '{cluster.url}'}}}}]\n"
            "users: [{name: u, user: {token: secret}}]\n"
            "contexts: [{name: test, context: {cluster: kmock, user: u}}]\n"
        )
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        env.pop("KUBERNETES_SERVICE_HOST", None)
        splitserve = Path(sys.executable).with_name("splitserve")
        command = [str(splitserve), "operator", "run", "--interval", "0.5", "--health-port", "0"]
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            colocated = ISVC | {"spec": ISVC["spec"] | {"prefill": {"replicas": 0}}}
            await cluster.call("POST", ISVC_PATH, colocated)
            await eventually(
                lambda: condition(cluster.get("inferenceservices", "chat"), "Ready") == "True",
                "Ready=True from the CLI-run operator",
                timeout=30,
            )
            names = {
                d["metadata"]["name"].rsplit("-", 1)[0] for d in cluster.objects("deployments")
            }
            assert names == {"chat-decode", "chat"}  # chat-decode-<hash>, chat-router
        finally:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
