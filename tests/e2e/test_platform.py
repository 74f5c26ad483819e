"""What a platform team passes through to the pods, Prometheus discovery, and the GPU example,
on the real cluster (issue 18, items 3 and 4).

One InferenceService gets every per-role pass-through field, and serves a `file://` model that
only a pass-through volume provides (the staged model folder, a hostPath volume at
/mnt/weights). The proof is in what runs: the API server's admission resolved the priority
class and kept the runtime class; the engine process's own environment (its
/proc/PID/environ), the files and the /dev/shm size in its mount namespace; the annotations
Prometheus' kubernetes_sd relabelling reads, followed to each pod's metrics.

Not shown here: NetworkPolicy enforcement (the local cluster has no CNI that enforces policies;
the policy is applied and stored with its metrics rule, which is what the operator controls), and
GPUs (none on these machines: the GPU example is applied as written and must wait for a GPU
node, saying so in its Ready condition).
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import e2e_support as S
import pytest
from kubernetes import client

from splitserve.cluster.controlplane.testing import wait_until

# Several engines start at once on two shared cores: more than the suite's default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]

PRIORITY_CLASS = "splitserve-e2e-serving"
RUNTIME_CLASS = "splitserve-e2e"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
GPU_EXAMPLE = S.EXAMPLES / "gpu" / "qwen2.5-7b-disaggregated.yaml"


def _extras(model_dir: Path) -> dict:
    return {
        "env": [
            {"name": "TEAM", "value": "search"},
            {"name": "TEAM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "team", "key": "token"}}},
            {"name": "HF_HOME", "value": "/tmp/hf"},  # replaces the operator's value
        ],
        "envFrom": [{"configMapRef": {"name": "tuning"}, "prefix": "TUNE_"}],
        "volumes": [
            {"name": "weights", "hostPath": {"path": str(model_dir.parent), "type": "Directory"}},
            {"name": "extra", "configMap": {"name": "extra-files"}},
        ],
        "volumeMounts": [
            {"name": "weights", "mountPath": "/mnt/weights", "readOnly": True},
            {"name": "extra", "mountPath": "/etc/extra", "readOnly": True},
        ],
        "priorityClassName": PRIORITY_CLASS,
        "runtimeClassName": RUNTIME_CLASS,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "DoNotSchedule",
            },
        ],  # fmt: skip
        "podAnnotations": {"team.example/owner": "search"},
        "podLabels": {"team": "search"},
        "serviceAccount": {"annotations": {"iam.example/role": "model-reader"}},
        "shmSize": "256Mi",
    }


@pytest.fixture(scope="module")
def platform(namespaces: S.Namespaces, core, api, custom, kubeconfig, model_dir: Path):
    scheduling = client.SchedulingV1Api(api)
    node = client.NodeV1Api(api)
    priority = client.V1PriorityClass(metadata=client.V1ObjectMeta(name=PRIORITY_CLASS), value=1000)
    runtime = client.V1RuntimeClass(
        metadata=client.V1ObjectMeta(name=RUNTIME_CLASS), handler="runc"
    )
    scheduling.create_priority_class(priority)
    node.create_runtime_class(runtime)
    ns = namespaces.create("platform", model_claim=False)
    core.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="tuning"), data={"MAX_BATCH": "8"}))  # fmt: skip
    core.create_namespaced_config_map(ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="extra-files"), data={"note.txt": "hello"}))  # fmt: skip
    core.create_namespaced_secret(ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="team"), string_data={"token": "s3cr3t"}))  # fmt: skip
    body = S.isvc_body("extras", prefill=0, decode=1)
    spec = body["spec"]
    spec["model"]["uri"] = f"file:///mnt/weights/{model_dir.name}"
    spec["decode"] |= _extras(model_dir)
    spec["router"] |= {"podLabels": {"team": "search"}, "env": [{"name": "NOTE", "value": "r"}]}
    spec["observability"] = {"metrics": {"allowFrom": [MONITORING]}}
    isvc = S.Isvc.create(custom, ns, body)
    gpu_ns = namespaces.create("gpu", model_claim=False)
    S.apply_yaml(GPU_EXAMPLE.read_text(), gpu_ns, kubeconfig)
    yield isvc, S.Isvc(custom, gpu_ns, "qwen-7b")
    scheduling.delete_priority_class(PRIORITY_CLASS)
    node.delete_runtime_class(RUNTIME_CLASS)


def _engine_pid(node_state: Path, pod) -> int:
    return S.container_pids(node_state, pod, "engine")[-1]  # the shim, then the entrypoint


def test_pass_through_reaches_the_running_engine(platform, core, node_state, offline) -> None:
    isvc, _ = platform
    isvc.wait_ready()
    sdk = S.openai_client(S.service_url(isvc.namespace, isvc.name))
    S.wait_serving(sdk, "smollm2")
    # The model comes from the pass-through volume: file:///mnt/weights/<model>.
    assert S.complete(sdk, "smollm2", S.PROMPTS[0]) == offline.text(S.PROMPTS[0])
    (pod,) = [p for p in S.engine_pods(core, isvc.namespace, isvc.name, "decode") if S.pod_ready(p)]
    # Admission saw the classes: the priority is the class's value, the runtime class is kept.
    assert pod.spec.priority_class_name == PRIORITY_CLASS and pod.spec.priority == 1000
    assert pod.spec.runtime_class_name == RUNTIME_CLASS
    (spread,) = pod.spec.topology_spread_constraints
    assert spread.label_selector.match_labels == {
        "serving.splitserve.io/inferenceservice": "extras", "serving.splitserve.io/role": "decode"
    }  # fmt: skip
    assert pod.metadata.labels["team"] == "search"
    assert pod.metadata.annotations["team.example/owner"] == "search"
    account = core.read_namespaced_service_account("extras-engine", isvc.namespace)
    assert account.metadata.annotations["iam.example/role"] == "model-reader"

    pid = _engine_pid(node_state, pod)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
    assert (env["TEAM"], env["TEAM_TOKEN"], env["TUNE_MAX_BATCH"]) == ("search", "s3cr3t", "8")
    assert env["HF_HOME"] == "/tmp/hf"
    root = Path(f"/proc/{pid}/root")
    assert (root / "etc/extra/note.txt").read_text() == "hello"
    assert (root / "mnt/weights" / Path(isvc.get()["spec"]["model"]["uri"]).name).is_dir()
    shm = [line for line in Path(f"/proc/{pid}/mounts").read_text().splitlines()
           if line.split()[1] == "/dev/shm"]  # fmt: skip
    assert shm and "size=262144k" in shm[-1], shm

    (router,) = [p for p in S.engine_pods(core, isvc.namespace, isvc.name, "router")]
    assert router.metadata.labels["team"] == "search"
    assert "priority_class_name" not in {k for k, v in router.spec.to_dict().items() if v}


def test_prometheus_discovers_every_pod_by_its_annotations(platform, core) -> None:
    """What Prometheus' kubernetes_sd `role: pod` example relabelling does: keep pods with
    prometheus.io/scrape=true, scrape podIP:prometheus.io/port at prometheus.io/path."""
    isvc, _ = platform
    isvc.wait_ready()
    pods = [p for p in core.list_namespaced_pod(isvc.namespace).items if S.pod_ready(p)]
    targets = {}
    for pod in pods:
        a = pod.metadata.annotations or {}
        if a.get("prometheus.io/scrape") == "true":
            url = f"http://{pod.status.pod_ip}:{a['prometheus.io/port']}{a['prometheus.io/path']}"
            targets[pod.metadata.labels["serving.splitserve.io/role"]] = url
    assert set(targets) == {"decode", "router"}
    bodies = {role: urllib.request.urlopen(url, timeout=10).read().decode()
              for role, url in targets.items()}  # fmt: skip
    assert re.search(r"^vllm:num_requests_running\b", bodies["decode"], re.M)
    assert re.search(r"^splitserve_router_requests_total\b", bodies["router"], re.M)


def test_network_policy_admits_the_monitoring_namespace_to_metrics(platform, api) -> None:
    isvc, _ = platform
    policy = client.NetworkingV1Api(api).read_namespaced_network_policy(
        "extras-engines", isvc.namespace
    )
    rules = [r.to_dict() for r in policy.spec.ingress]
    metrics = [r for r in rules if r["_from"] and r["_from"][0]["namespace_selector"]]
    assert len(metrics) == 1
    assert metrics[0]["_from"][0]["namespace_selector"]["match_labels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert [(p["protocol"], p["port"]) for p in metrics[0]["ports"]] == [("TCP", 9090)]


def test_gpu_example_waits_for_a_gpu_node_and_says_so(platform, core) -> None:
    _, gpu = platform

    def waiting() -> dict | None:
        cond = gpu.condition("Ready")
        return cond if "Insufficient nvidia.com/gpu" in cond.get("message", "") else None

    ready = wait_until("Ready=False naming the missing GPUs", waiting, timeout=180)
    assert ready["status"] == "False"
    assert gpu.condition("Degraded")["status"] == "False"  # waiting for a node is no failure
    for role in ("prefill", "decode"):
        for pod in S.engine_pods(core, gpu.namespace, gpu.name, role):
            assert pod.status.phase == "Pending"
            c = pod.spec.containers[0]
            assert c.args[c.args.index("--device") + 1] == "cuda"
            assert c.resources.limits["nvidia.com/gpu"] == "1"
            assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule"
                       for t in pod.spec.tolerations)  # fmt: skip
