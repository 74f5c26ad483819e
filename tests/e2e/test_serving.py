"""Scenarios a and b: the examples serve, and 1P:2D over NIXL and over gRPC give the colocated text.

a. Each manifests/examples/*.yaml is `kubectl apply`-ed, as a user would, into its own namespace
   (with the claim `llm-weights` holding the converted default model and the Secret it names, as
   its header asks); it must turn Ready with every printer column filled, and the official openai
   SDK, through the router's Service (`scripts/cluster url`), must get `splitserve generate`'s
   greedy text. The files are applied as committed: an `hf://` model is downloaded by the pods'
   download step from the hub emulator, which the namespace's pods reach through the test's
   webhook (hub_route.py; no real hub is reachable from the test cluster).
   With a CRD of KServe's shape installed beside ours (kind InferenceService, plural
   inferenceservices, short name isvc, group serving.kserve.io), `kubectl get ssvc` and the
   `splitserve` category still name ours, unambiguously.
b. 1 prefill + 2 decode pods over NIXL (the disaggregated example is exactly that) and over gRPC
   (an InferenceService of its own) give the colocated example's text for every prompt. The
   hand-offs are real: each decode pod's own metrics count KV blocks received over that
   transport, and no transfer failed (a failed pull is recomputed and would still give the right
   text, so the text alone proves nothing about the transport).

Everything is applied at once (the engines start together), then checked one by one.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import e2e_support as S
import openai
import pytest
from kubernetes import client

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

EXAMPLE_FILES = sorted(p for p in S.EXAMPLES.glob("*.yaml") if p.name != "kustomization.yaml")
COLOCATED, DISAGGREGATED = "colocated-small.yaml", "disaggregated-1p2d.yaml"


@dataclass(frozen=True)
class Served:
    isvc: S.Isvc
    served_name: str
    api_key: str | None = None

    def sdk(self, api_key: str | None = None) -> openai.OpenAI:
        base = S.service_url(self.isvc.namespace, self.isvc.name)
        return S.openai_client(base, api_key=api_key or self.api_key or "unused")

    def texts(self) -> dict[str, str]:
        self.isvc.wait_ready()
        sdk = self.sdk()
        S.wait_serving(sdk, self.served_name)
        return {p: S.complete(sdk, self.served_name, p) for p in S.PROMPTS}


def _served_name(model: dict) -> str:
    """What the operator serves the model as: servedName, else the hub id, else the last part."""
    if model.get("servedName"):
        return model["servedName"]
    return (
        model["uri"].split("://", 1)[1].rstrip("/")
        if model["uri"].startswith("hf://")
        else (model["uri"].rstrip("/").rsplit("/", 1)[-1])
    )


def _apply_example(path: Path, namespaces: S.Namespaces, core, custom, kubeconfig) -> Served:
    (doc,) = S.example_documents(path)
    ns = namespaces.create(path.stem[:20], hub_route=True)
    key = None
    secret_ref = doc["spec"].get("router", {}).get("apiKeySecret")
    if secret_ref:
        key = secrets.token_hex(16)
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret_ref["name"]),
            string_data={secret_ref.get("key", "api-keys"): key + "\n"},
        )
        core.create_namespaced_secret(ns, secret)
    S.apply_yaml(path.read_text(), ns, kubeconfig)
    return Served(
        S.Isvc(custom, ns, doc["metadata"]["name"]), _served_name(doc["spec"]["model"]), key
    )


# What KServe installs for its InferenceService, reduced to the names (which is what clashes).
KSERVE_LIKE_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: inferenceservices.serving.kserve.io
spec:
  group: serving.kserve.io
  scope: Namespaced
  names:
    kind: InferenceService
    listKind: InferenceServiceList
    plural: inferenceservices
    singular: inferenceservice
    shortNames: [isvc]
  versions:
  - name: v1beta1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"""


@pytest.fixture(scope="module")
def kserve_crd(kubeconfig: Path) -> Iterator[None]:
    """KServe's InferenceService names installed beside ours for the module."""
    S.checked(S.run_tool("kubectl", "apply", "-f", "-", kubeconfig=kubeconfig,
                         stdin=KSERVE_LIKE_CRD))  # fmt: skip
    crd = "crd/inferenceservices.serving.kserve.io"
    wait = ["wait", "--for=condition=Established", "--timeout=60s", crd]
    S.checked(S.run_tool("kubectl", *wait, kubeconfig=kubeconfig))
    yield
    S.run_tool("kubectl", "delete", "crd", "inferenceservices.serving.kserve.io",
               "--wait=false", kubeconfig=kubeconfig)  # fmt: skip


@pytest.fixture(scope="module")
def deployed(
    namespaces: S.Namespaces, core, custom, kubeconfig: Path, hub_route
) -> dict[str, Served]:
    out = {p.name: _apply_example(p, namespaces, core, custom, kubeconfig) for p in EXAMPLE_FILES}
    ns = namespaces.create("grpc")
    body = S.isvc_body("pd-grpc", prefill=1, decode=2, transport="grpc", policy="round_robin")
    out["grpc"] = Served(S.Isvc.create(custom, ns, body), "smollm2")
    return out


def test_examples_are_all_tested() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {COLOCATED, DISAGGREGATED}


@pytest.mark.parametrize("example", [p.name for p in EXAMPLE_FILES])
def test_example_serves_the_offline_text(
    example: str, deployed, kubeconfig: Path, offline, kserve_crd
) -> None:
    d: Served = deployed[example]
    obj = d.isvc.wait_ready()
    name, ns = d.isvc.name, d.isvc.namespace

    # Printer columns, as `kubectl get ssvc` shows them (KServe's CRD installed beside ours):
    # all filled, the pools full. The category and the full name list ours too; `isvc` is KServe's.
    def get(*what: str) -> str:
        return S.checked(S.run_tool("kubectl", "get", *what, "-n", ns, kubeconfig=kubeconfig))

    out = get("ssvc", name)
    # Both short names resolve to our group (compared by name: the AGE column ticks between calls).
    ours = f"inferenceservice.serving.splitserve.io/{name}"
    assert get("ssvc", name, "-o", "name").strip() == ours
    assert get("splitisvc", name, "-o", "name").strip() == ours
    assert name in get("inferenceservices.serving.splitserve.io")
    assert name in get("splitserve")  # the category
    theirs = S.run_tool("kubectl", "get", "isvc", name, "-n", ns, kubeconfig=kubeconfig)
    assert theirs.returncode != 0 and "serving.kserve.io" in theirs.stderr, theirs
    header, row = out.splitlines()[:2]
    columns = dict(zip(header.split(), row.split(), strict=True))
    assert set(columns) == {"NAME", "MODEL", "PREFILL", "DECODE", "URL", "READY", "AGE"}
    assert "<none>" not in columns.values(), out
    assert columns["READY"] == "True"
    assert columns["MODEL"] == obj["spec"]["model"]["uri"]
    prefill, decode = obj["spec"]["prefill"]["replicas"], obj["spec"]["decode"]["replicas"]
    assert (columns["PREFILL"], columns["DECODE"]) == (f"{prefill}/{prefill}", f"{decode}/{decode}")
    assert columns["URL"] == obj["status"]["url"] == f"http://{name}.{ns}.svc.cluster.local"

    sdk = d.sdk()
    S.wait_serving(sdk, d.served_name)
    for prompt in S.PROMPTS[:2]:
        assert S.complete(sdk, d.served_name, prompt) == offline.text(prompt), prompt
    assert S.stream(sdk, d.served_name, S.PROMPTS[2]) == offline.text(S.PROMPTS[2])
    names = [m.id for m in sdk.models.list().data]
    assert names[0] == d.served_name, names  # the name responses report comes first
    if obj["spec"]["model"]["uri"].startswith("hf://") and not obj["spec"]["model"].get(
        "servedName"
    ):
        # A hub model is served as its hub id, and by its short name too.
        short = d.served_name.rsplit("/", 1)[-1]
        assert names == [d.served_name, short]
        assert S.complete(sdk, short, S.PROMPTS[0]) == offline.text(S.PROMPTS[0])
    if d.api_key:
        with pytest.raises(openai.AuthenticationError):
            S.complete(d.sdk(api_key="wrong"), d.served_name, S.PROMPTS[0])


@pytest.mark.parametrize("transport", ["nixl", "grpc"])
def test_one_prefill_two_decode_matches_colocated(
    transport: str, deployed, core: client.CoreV1Api, node_state: Path, offline
) -> None:
    colocated = deployed[COLOCATED].texts()
    assert colocated == {p: offline.text(p) for p in S.PROMPTS}
    served = deployed[DISAGGREGATED if transport == "nixl" else "grpc"]
    spec = served.isvc.get()["spec"]
    assert (spec["prefill"]["replicas"], spec["decode"]["replicas"]) == (1, 2)
    assert spec["kvTransfer"]["transport"] == transport
    # Enough requests that both decode pods take some (least load and round robin alternate).
    assert served.texts() == colocated
    assert served.texts() == colocated

    isvc = served.isvc
    decodes = [
        p for p in S.engine_pods(core, isvc.namespace, isvc.name, "decode") if S.pod_ready(p)
    ]
    assert len(decodes) == 2
    received = {}
    for pod in decodes:
        samples = S.scrape(pod.status.pod_ip)
        name = "splitserve:kv_transfer_blocks_total"
        received[pod.metadata.name] = S.metric_sum(
            samples, name, direction="received", transport=transport
        )
        failures = S.metric_sum(samples, "splitserve:kv_transfer_failures_total")
        assert failures == 0, f"{pod.metadata.name}: {failures} failed KV transfers"
    assert all(n > 0 for n in received.values()), f"KV blocks received over {transport}: {received}"
    # The image's prebuilt C++ kernels, not a compile at start, and the engines use them.
    for pod in [*decodes, *S.engine_pods(core, isvc.namespace, isvc.name, "prefill")]:
        log = S.pod_log(node_state, pod, "engine")
        assert "C++ CPU kernels: prebuilt /opt/splitserve/" in log, log[-2000:]
        assert "cpu attention" in log, log[-2000:]
