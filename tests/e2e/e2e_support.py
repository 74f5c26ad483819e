"""Helpers of the end-to-end scenarios: InferenceServices, the tools, the router, engine pods.

Everything here waits by polling with a deadline (`wait_until`) and names what it waits for, so a
timeout says what did not happen. Imported by module name (tests/e2e is put on sys.path by its
conftest, as tests/fixtures is by the root one).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client.parser import text_string_to_metric_families

from splitserve.cluster import models
from splitserve.cluster.controlplane.testing import wait_until
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".cache" / "tools"
EXAMPLES = REPO / "manifests" / "examples"
GROUP, VERSION, PLURAL = "serving.splitserve.io", "v1alpha1", "inferenceservices"
TEST_LABEL = "splitserve.test/suite"
NO_NODE_LABEL = "splitserve.test/no-such-node"
# The claim every test namespace gets, holding the converted default model (cluster/models.py).
CLAIM = models.DEFAULT_CLAIM
MODEL_URI = f"pvc://{CLAIM}/{models.DEFAULT_MODEL}"
# The examples' hub model, served to the cluster by the hub emulator (hub_route.py).
HUB_MODEL_URI = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"

# Engines start in ~20-40 s here (import, weights, NIXL/UCX); a wave of several pods on the two
# shared cores takes longer, a first image refresh minutes.
READY_TIMEOUT_S = 420.0
MAX_TOKENS = 8
# Prompts whose greedy continuations are far from ties, so batching and bf16 rounding cannot flip
# a token: every scenario compares texts exactly. Measured (offline, bf16, 8 tokens): the
# smallest gap between the top two logprobs over the steps is 3.25, 2.63, 1.75 and 1.5 nats.
# Prose prompts ("The capital of France is", "Monday, Tuesday, Wednesday,") have steps within
# 0.1 nats and do change with the batch they run in.
PROMPTS = ("1, 2, 3, 4,", "A, B, C, D, E,", "1 2 3 4 5 6", "5, 6, 7, 8,")


def tool(name: str) -> Path:
    """A binary from `make tools` (helm, kubectl)."""
    return TOOLS / name


def run_tool(
    name: str, *args: str, kubeconfig: Path, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run helm/kubectl against the cluster; the result, never raising on a non-zero exit."""
    env = os.environ | {"KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [str(tool(name)), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def checked(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout of a tool run that must succeed (fails the test with stderr otherwise)."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
        )
    return proc.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---- namespaces and the model volume -------------------------------------------------------


@dataclass
class Namespaces:
    """Creates test namespaces (each with the model claim) and removes them, and their
    PersistentVolumes, at the end."""

    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    model_dir: Path
    created: list[str] = field(default_factory=list)

    def create(
        self, prefix: str = "e2e", *, model_claim: bool = True, hub_route: bool = False
    ) -> str:
        """A fresh namespace; ``hub_route``: its pods' download steps reach the hub emulator
        (hub_route.py; the ``hub_route`` fixture must be active)."""
        name = unique(prefix)
        labels = {TEST_LABEL: "e2e"}
        if hub_route:
            labels["splitserve.test/hub-route"] = "emulated"
        meta = client.V1ObjectMeta(name=name, labels=labels)
        self.core.create_namespace(client.V1Namespace(metadata=meta))
        self.created.append(name)
        wait_until(
            f"ServiceAccount {name}/default (serviceaccount controller)",
            lambda: self.core.read_namespaced_service_account("default", name),
            timeout=120,
        )
        if model_claim:
            self.add_model_claim(name)
        return name

    def add_model_claim(self, namespace: str, claim: str = CLAIM) -> None:
        """A hostPath PersistentVolume holding the staged default model, bound to `claim`."""
        pv, pvc = models.volume_manifests(namespace, self.model_dir.parent, claim)
        self.core.create_persistent_volume(pv)
        self.core.create_namespaced_persistent_volume_claim(namespace, pvc)

    def cleanup(self, timeout: float = 180.0) -> None:
        """Delete the InferenceServices first and wait until they are gone (the operator's
        finalizer, while the namespace still takes its Events), then the namespaces and their
        volumes, without waiting for those (pods drain in the background)."""
        for ns in self.created:
            for obj in self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                "items"
            ]:
                with contextlib.suppress(ApiException):
                    self.custom.delete_namespaced_custom_object(
                        GROUP, VERSION, ns, PLURAL, obj["metadata"]["name"]
                    )

        def isvcs_gone() -> bool:
            return not any(
                self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                for ns in self.created
            )

        try:
            wait_until("the test InferenceServices deleted", isvcs_gone, timeout=timeout)
        finally:
            for name in self.created:
                with contextlib.suppress(ApiException):
                    self.core.delete_namespace(name)
                for pv in self.core.list_persistent_volume().items:
                    ref = pv.spec.claim_ref
                    if ref is not None and ref.namespace == name:
                        self.core.delete_persistent_volume(pv.metadata.name)


# ---- InferenceServices ---------------------------------------------------------------------


def isvc_body(
    name: str,
    *,
    prefill: int,
    decode: int,
    transport: str = "grpc",
    failure_policy: str = "recompute",
    revision: str = "",
    max_model_len: int = 512,
    extra_args: tuple[str, ...] = (),
    policy: str = "least_load",
    pending: tuple[str, ...] = (),
    model_uri: str = MODEL_URI,
) -> dict[str, Any]:
    """A small CPU InferenceService of the default model from the test claim.

    ``pending`` names pools ("prefill", "decode", "router") whose pods must never run: their
    nodeSelector matches no node, so they stay Pending (children that cost no CPU).
    """
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": model_uri, "revision": revision, "servedName": "smollm2"},
            "image": "ghcr.io/splitserve/splitserve:0.1.0",
            "engine": {
                "dtype": "bfloat16",
                "maxModelLen": max_model_len,
                "maxNumSeqs": 8,
                # A small KV pool: several engines share this machine's memory.
                "extraArgs": ["--kv-cache-memory-gb", "0.25", *extra_args],
            },
            "prefill": {"replicas": prefill},
            "decode": {"replicas": decode},
            "router": {"replicas": 1, "policy": policy},
            "kvTransfer": {"transport": transport, "failurePolicy": failure_policy},
        },
    }
    for pool in pending:
        body["spec"][pool]["nodeSelector"] = {NO_NODE_LABEL: "true"}
    return body


class Isvc:
    """One InferenceService, through the admin's custom-objects client."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str, name: str) -> None:
        self.custom, self.namespace, self.name = custom, namespace, name

    @classmethod
    def create(cls, custom: client.CustomObjectsApi, namespace: str, body: dict) -> Isvc:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        return cls(custom, namespace, body["metadata"]["name"])

    def get(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, body
        )

    def delete(self) -> None:
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )

    def condition(self, kind: str, obj: dict[str, Any] | None = None) -> dict[str, Any]:
        status = (obj or self.get()).get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == kind:
                return cond
        return {}

    def rolled_out(self) -> dict[str, Any] | None:
        """The object when Ready=True for its current generation and serving the desired
        rollout hash, else None."""
        obj = self.get()
        status = obj.get("status") or {}
        ready = self.condition("Ready", obj)
        if (
            ready.get("status") == "True"
            and ready.get("observedGeneration") == obj["metadata"]["generation"]
            and status.get("rolloutHash")
            and status.get("rolloutHash") == status.get("desiredRolloutHash")
        ):
            return obj
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            return self.rolled_out()

        try:
            return wait_until(f"InferenceService {self} Ready", check, timeout=timeout)
        except BaseException:
            print(f"last status of {self}: {json.dumps(self.get().get('status'), indent=1)}")
            raise

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def apply_yaml(text: str, namespace: str, kubeconfig: Path) -> str:
    """`kubectl apply -n NAMESPACE -f -` of a manifest; its output."""
    apply = ["apply", "-n", namespace, "-f", "-"]
    return checked(run_tool("kubectl", *apply, kubeconfig=kubeconfig, stdin=text))


def example_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---- the router, as a client sees it --------------------------------------------------------


def service_url(namespace: str, name: str) -> str:
    """`scripts/cluster url NAMESPACE/SERVICE`: an http:// address on this host."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "cluster"), "url", f"{namespace}/{name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return checked(proc).strip()


def openai_client(base: str, api_key: str = "unused", retries: int = 0) -> openai.OpenAI:
    """The official SDK against the router (no silent retries: a failure counts)."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=retries, timeout=120)


def complete(sdk: openai.OpenAI, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    r = sdk.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def stream(sdk: openai.OpenAI, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    chunks = sdk.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join(c.choices[0].text for c in chunks if c.choices)


def wait_serving(sdk: openai.OpenAI, model: str, timeout: float = 120.0) -> None:
    """Until the router answers a completion (its /health turns ready a moment after the
    InferenceService does: it learns pods from EndpointSlice watches)."""
    wait_until(
        "the router serves a completion",
        lambda: complete(sdk, model, PROMPTS[0], max_tokens=1) is not None,
        timeout=timeout,
        interval=1.0,
    )


# ---- offline reference ---------------------------------------------------------------------


class OfflineReference:
    """`splitserve generate` (the development venv, no cluster) for PROMPTS, started at once in
    the background; `text(prompt)` waits for it. Greedy, bf16 like the engines' default."""

    def __init__(self, model_dir: Path, max_tokens: int = MAX_TOKENS) -> None:
        argv = [str(REPO / ".venv" / "bin" / "splitserve"), "generate", "--model", str(model_dir)]
        argv += ["--dtype", "bfloat16", "--temperature", "0", "--max-tokens", str(max_tokens)]
        argv += ["--json"]
        for prompt in PROMPTS:
            argv += ["--prompt", prompt]
        self.argv = argv
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )
        self._texts: dict[str, str] | None = None

    def texts(self) -> dict[str, str]:
        if self._texts is None:
            out, err = self._proc.communicate(timeout=600)
            if self._proc.returncode != 0:
                raise AssertionError(f"{' '.join(self.argv)} failed:\n{err[-3000:]}")
            rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            self._texts = {row["prompt"]: row["outputs"][0]["text"] for row in rows}
        return self._texts

    def text(self, prompt: str) -> str:
        return self.texts()[prompt]


# ---- engine pods ---------------------------------------------------------------------------


def engine_pods(core: client.CoreV1Api, namespace: str, isvc: str, role: str) -> list:
    selector = f"serving.splitserve.io/inferenceservice={isvc},serving.splitserve.io/role={role}"
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def pod_ready(pod: client.V1Pod) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
    )


def engine_info(pod_ip: str, port: int = 50051, timeout: float = 10.0) -> pb.EngineInfo:
    """EngineService.GetInfo of one engine pod (its KV compatibility hash, role, model)."""
    with grpc.insecure_channel(f"{pod_ip}:{port}") as channel:
        return pb_grpc.EngineServiceStub(channel).GetInfo(pb.EngineInfoRequest(), timeout=timeout)


def engine_stats(pod_ip: str, port: int = 50051, timeout: float = 5.0) -> pb.EngineStats:
    """EngineService.GetStats of one engine pod (running/waiting requests, leases)."""
    with grpc.insecure_channel(f"{pod_ip}:{port}") as channel:
        return pb_grpc.EngineServiceStub(channel).GetStats(pb.StatsRequest(), timeout=timeout)


def scrape(pod_ip: str, port: int = 9090, timeout: float = 5.0) -> dict[tuple, float]:
    """A pod's Prometheus metrics: {(sample name, sorted label items): value}."""
    with urllib.request.urlopen(f"http://{pod_ip}:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def container_pids(node_state: Path, pod: client.V1Pod, container: str) -> list[int]:
    """Host pids of a container, as the node agent records them (shim, then the container's
    init, which is the entrypoint itself): <state>/pods/<ns>_<name>_<uid>/containers/<c>/pids."""
    folder = f"{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid}"
    path = node_state / "pods" / folder / "containers" / container / "pids"
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def pod_log(node_state: Path, pod: client.V1Pod, container: str) -> str:
    """What a container wrote (the node agent's log file; no `kubectl logs` here)."""
    folder = f"{pod.metadata.namespace}_{pod.metadata.name}_{pod.metadata.uid}"
    path = node_state / "pods" / folder / f"{container}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Load:
    """Client threads sending completions without pause; results are kept per request."""

    work: Callable[[int], str]  # request number -> text (raises on failure)
    results: list[tuple[int, float, float, str | None, str | None]] = field(default_factory=list)
    _stop: bool = False

    def run(self) -> None:
        i = 0
        while not self._stop:
            begun = time.monotonic()
            try:
                text, error = self.work(i), None
            except Exception as exc:  # noqa: BLE001 - every failure is a result to report
                text, error = None, f"{type(exc).__name__}: {exc}"
            self.results.append((i, begun, time.monotonic(), text, error))
            i += 1

    def stop(self) -> None:
        self._stop = True


def threads(load: Load, count: int) -> Iterator[Any]:
    """Start ``count`` threads running ``load``; yields them (join after ``load.stop()``)."""
    import threading

    started = [threading.Thread(target=load.run, daemon=True) for _ in range(count)]
    for t in started:
        t.start()
    yield from started


def wait_for_object(read: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``read`` (a client read call) until it returns the object."""
    return wait_until(f"{what} exists", read, timeout=timeout)
