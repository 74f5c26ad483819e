"""Pure builders: for a matrix of specs, the desired objects are right and valid for 1.30."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.operator import labels as L
from splitserve.operator.builders import build_desired, config_checksum
from splitserve.operator.spec import parse

MATRIX = {
    "disaggregated-pvc": {},
    "colocated-hf": {"model": {"uri": "hf://org/name"}, "prefill": {"replicas": 0}},
    "file-grpc-keys-lb": {
        "model": {"uri": "file:///models/tiny", "servedName": "tiny"},
        "kvTransfer": {"transport": "grpc", "failurePolicy": "fail", "leaseSeconds": 5},
        "router": {
            "replicas": 3,
            "policy": "session",
            "service": {"type": "LoadBalancer", "port": 8443, "annotations": {"a": "b"}},
            "apiKeySecret": {"name": "keys", "key": "tokens.txt"},
        },
        "engine": {"extraArgs": ["--enforce-eager"], "maxNumSeqs": 7},
        "decode": {
            "replicas": 4,
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "rollout": {"maxSurge": "25%", "maxUnavailable": 1},
        "imagePullSecrets": [{"name": "regcred"}],
    },
}


def objects_of(make_isvc, change: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{o['kind']}/{o['metadata']['name']}": o for o in build_desired(parse(make_isvc(change)))
    }


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("case", MATRIX)
def test_every_object_is_valid_owned_and_labelled(make_isvc, validate_k8s, case) -> None:
    objects = objects_of(make_isvc, MATRIX[case])
    assert validate_k8s(list(objects.values())) == []
    for obj in objects.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "serving.splitserve.io/v1alpha1",
            "kind": "InferenceService",
            "name": "chat",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["labels"][L.INSTANCE_LABEL] == "chat"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "splitserve-operator"


def test_disaggregated_objects(make_isvc) -> None:
    objects = objects_of(make_isvc, {})
    assert set(objects) == {
        "ServiceAccount/chat-engine", "ServiceAccount/chat-router", "Role/chat-router",
        "RoleBinding/chat-router", "ConfigMap/chat-engine", "Service/chat-prefill",
        "Service/chat-decode", "Service/chat", "NetworkPolicy/chat-engines",
        "PodDisruptionBudget/chat-prefill", "PodDisruptionBudget/chat-decode",
        "PodDisruptionBudget/chat-router", "Deployment/chat-prefill", "Deployment/chat-decode",
        "Deployment/chat-router",
    }  # fmt: skip
    replicas = {r: objects[f"Deployment/chat-{r}"]["spec"]["replicas"] for r in L.ENGINE_ROLES}
    assert replicas == {"prefill": 1, "decode": 2}
    assert objects["Service/chat-prefill"]["spec"]["clusterIP"] == "None"
    assert objects["Service/chat"]["spec"]["type"] == "ClusterIP"


def test_colocated_has_no_prefill_pool(make_isvc) -> None:
    objects = objects_of(make_isvc, {"prefill": {"replicas": 0}})
    assert not [k for k in objects if k.endswith("-prefill")]
    decode = container(objects["Deployment/chat-decode"])
    assert decode["args"][:2] == ["decode", "--colocated"]
    router_args = container(objects["Deployment/chat-router"])["args"]
    selector = router_args[router_args.index("--decode-selector") + 1]
    assert router_args[router_args.index("--prefill-selector") + 1] == selector


def test_engine_command_lines_follow_the_contract(make_isvc) -> None:
    objects = objects_of(make_isvc, {"engine": {"extraArgs": ["--enforce-eager"]}})
    common = [
        "--model", "/models/weights/smollm2", "--revision", "abc123", "--served-name", "smollm2",
        "--dtype", "bfloat16", "--block-size", "16", "--max-model-len", "4096",
        "--max-num-seqs", "128", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090",
        "--kv-transport", "nixl", "--lease-seconds", "30",
    ]  # fmt: skip
    prefill = container(objects["Deployment/chat-prefill"])["args"]
    decode = container(objects["Deployment/chat-decode"])["args"]
    assert prefill == ["prefill", *common, "--enforce-eager"]
    assert decode == ["decode", *common, "--kv-failure-policy", "recompute", "--enforce-eager"]


def test_router_command_line_and_api_keys(make_isvc) -> None:
    change = {"router": {"apiKeySecret": {"name": "keys"}, "policy": "least_load"}}
    objects = objects_of(make_isvc, change)
    dep = objects["Deployment/chat-router"]
    c = container(dep)
    assert c["args"] == [
        "router", "--host", "0.0.0.0", "--port", "8000", "--policy", "least_load",
        "--discovery", "kubernetes", "--namespace", "ml",
        "--prefill-selector",
        "serving.splitserve.io/inferenceservice=chat,serving.splitserve.io/role=prefill",
        "--decode-selector",
        "serving.splitserve.io/inferenceservice=chat,serving.splitserve.io/role=decode",
        "--served-name", "smollm2", "--api-key-file", "/etc/splitserve/api-keys/api-keys",
    ]  # fmt: skip
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "chat-router"
    rules = objects["Role/chat-router"]["rules"]
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in rules)
    assert {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"]} in rules  # fmt: skip
    binding = objects["RoleBinding/chat-router"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chat-router", "namespace": "ml"}
    ]


@pytest.mark.parametrize("case", MATRIX)
def test_pods_are_secure_probed_and_labelled(make_isvc, case) -> None:
    isvc = parse(make_isvc(MATRIX[case]))
    for dep in (o for o in build_desired(isvc) if o["kind"] == "Deployment"):
        template = dep["spec"]["template"]
        pod, c = template["spec"], container(dep)
        role = dep["metadata"]["labels"][L.ROLE_LABEL]
        # The immutable selector uses only stable labels and matches the pods.
        assert dep["spec"]["selector"]["matchLabels"] == {
            L.INSTANCE_LABEL: "chat",
            L.ROLE_LABEL: role,
        }
        assert (
            dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        )
        assert template["metadata"]["labels"][L.ROLLOUT_HASH_LABEL] == isvc.spec.rollout_hash
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/home/splitserve/.cache"} <= mounts
        assert dep["spec"]["strategy"]["rollingUpdate"] == {
            "maxSurge": isvc.spec.rollout.max_surge,
            "maxUnavailable": isvc.spec.rollout.max_unavailable,
        }
        if role == L.ROUTER:
            assert c["livenessProbe"]["httpGet"]["path"] == "/health"
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": 50051}
        assert pod["automountServiceAccountToken"] is False
        checksum = template["metadata"]["annotations"][L.CONFIG_CHECKSUM_ANNOTATION]
        assert checksum == config_checksum(isvc)


def test_pvc_model_is_mounted_read_only(make_isvc) -> None:
    dep = objects_of(make_isvc, {})["Deployment/chat-decode"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    mount = next(m for m in container(dep)["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models/weights", "readOnly": True}
    hf = objects_of(make_isvc, {"model": {"uri": "hf://org/name"}})["Deployment/chat-decode"]
    assert "model" not in {v["name"] for v in hf["spec"]["template"]["spec"]["volumes"]}
    env = {e["name"]: e.get("value") for e in container(hf)["env"]}
    assert env["HF_HOME"] == "/home/splitserve/.cache/huggingface"


def test_network_policy_admits_only_router_and_peers(make_isvc) -> None:
    policy = objects_of(make_isvc, {})["NetworkPolicy/chat-engines"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    from_router, from_peers = policy["ingress"]
    assert from_router["from"] == [
        {"podSelector": {"matchLabels": {L.INSTANCE_LABEL: "chat", L.ROLE_LABEL: "router"}}}
    ]
    assert from_router["ports"] == [{"protocol": "TCP", "port": 50051}]
    assert from_peers["from"] == [{"podSelector": policy["podSelector"]}]
    assert "ports" not in from_peers  # NIXL/UCX picks its own ports


def test_pdbs_select_their_role(make_isvc) -> None:
    objects = objects_of(make_isvc, {})
    for role in ("prefill", "decode", "router"):
        pdb = objects[f"PodDisruptionBudget/chat-{role}"]["spec"]
        assert pdb == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {L.INSTANCE_LABEL: "chat", L.ROLE_LABEL: role}},
        }


ENGINE_CHANGES = [
    {"engine": {"dtype": "float32"}},
    {"engine": {"blockSize": 32}},
    {"engine": {"maxModelLen": 2048}},
    {"engine": {"maxNumSeqs": 64}},
    {"engine": {"extraArgs": ["--enforce-eager"]}},
    {"kvTransfer": {"transport": "grpc"}},
    {"kvTransfer": {"failurePolicy": "fail"}},
    {"kvTransfer": {"leaseSeconds": 60}},
    {"model": {"revision": "def456"}},
    {"model": {"uri": "pvc://weights/other"}},
]
OTHER_CHANGES = [
    {"decode": {"replicas": 5}},
    {"prefill": {"replicas": 3}},
    {"decode": {"resources": {"limits": {"memory": "9Gi"}}}},
    {"router": {"policy": "round_robin", "replicas": 2}},
    {"rollout": {"maxSurge": 2}},
    {"image": "registry.example/splitserve:0.2.0"},
]


@pytest.mark.parametrize("change", ENGINE_CHANGES, ids=str)
def test_config_checksum_changes_with_engine_settings(make_isvc, change) -> None:
    assert config_checksum(parse(make_isvc(change))) != config_checksum(parse(make_isvc()))


@pytest.mark.parametrize("change", OTHER_CHANGES, ids=str)
def test_config_checksum_ignores_everything_else(make_isvc, change) -> None:
    assert config_checksum(parse(make_isvc(change))) == config_checksum(parse(make_isvc()))


@pytest.mark.parametrize(
    ("change", "incompatible"),
    [
        ({"model": {"revision": "v2"}}, True),
        ({"image": "registry.example/splitserve:0.2.0"}, True),
        ({"engine": {"blockSize": 32}}, True),
        ({"kvTransfer": {"transport": "grpc"}}, True),
        ({"engine": {"maxNumSeqs": 7}}, False),
        ({"decode": {"replicas": 9}}, False),
    ],
    ids=str,
)
def test_rollout_hash(make_isvc, change, incompatible) -> None:
    old = parse(make_isvc()).spec.rollout_hash
    assert (parse(make_isvc(change)).spec.rollout_hash != old) is incompatible


def test_builders_are_deterministic(make_isvc) -> None:
    first = build_desired(parse(make_isvc(MATRIX["file-grpc-keys-lb"])))
    assert first == build_desired(parse(make_isvc(MATRIX["file-grpc-keys-lb"])))


def test_long_model_names_make_valid_label_values() -> None:
    value = L.label_value("org/" + "x" * 200)
    assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
    assert L.label_value("org/name") == "org.name"
