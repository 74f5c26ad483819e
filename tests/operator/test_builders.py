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
    """The desired objects by `Kind/name`; engine Deployments, named `NAME-ROLE-HASH` (one per
    generation), by `Deployment/NAME-ROLE` after their name is checked."""
    isvc = parse(make_isvc(change))
    out = {}
    for o in build_desired(isvc):
        name = o["metadata"]["name"]
        role = o["metadata"]["labels"].get(L.ROLE_LABEL)
        if o["kind"] == "Deployment" and role in L.ENGINE_ROLES:
            assert name == f"{isvc.name}-{role}-{isvc.spec.rollout_hash}"
            name = f"{isvc.name}-{role}"
        out[f"{o['kind']}/{name}"] = o
    return out


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
        "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090",
        "--kv-transport", "nixl", "--log-format", "text", "--drain-seconds", "60",
    ]  # fmt: skip
    prefill = container(objects["Deployment/chat-prefill"])["args"]
    decode = container(objects["Deployment/chat-decode"])["args"]
    assert prefill == ["prefill", *common, "--lease-seconds", "30", "--enforce-eager"]
    assert decode == ["decode", *common, "--kv-failure-policy", "recompute", "--enforce-eager"]


def test_performance_mode_and_max_num_seqs_reach_both_engines(make_isvc) -> None:
    objects = objects_of(make_isvc, {"engine": {"performanceMode": "interactivity"}})
    for role in ("prefill", "decode"):
        args = container(objects[f"Deployment/chat-{role}"])["args"]
        assert args[args.index("--performance-mode") + 1] == "interactivity"
        assert "--max-num-seqs" not in args  # the mode's
    both = {"engine": {"performanceMode": "throughput", "maxNumSeqs": 7}}
    args = container(objects_of(make_isvc, both)["Deployment/chat-decode"])["args"]
    assert args[args.index("--max-num-seqs") + 1] == "7"  # explicit wins (the engine resolves)
    # a new mode is a new engine configuration: the pods roll
    plain = objects_of(make_isvc, {})["Deployment/chat-decode"]
    moded = objects["Deployment/chat-decode"]
    assert (
        plain["spec"]["template"]["metadata"]["annotations"]
        != (moded["spec"]["template"]["metadata"]["annotations"])
    )


def test_quantization_renders_only_when_set_and_none_overrides_a_mode(make_isvc) -> None:
    def args(change: dict, role: str = "decode") -> list[str]:
        return container(objects_of(make_isvc, change)[f"Deployment/chat-{role}"])["args"]

    assert "--quantization" not in args({})  # unset: the engine's default (none)
    moded = args({"engine": {"performanceMode": "interactivity"}})
    assert "--quantization" not in moded  # the mode's (int8) is resolved by the engine
    for role in ("prefill", "decode"):  # both roles: their KV must stay compatible
        off = args({"engine": {"performanceMode": "interactivity", "quantization": "none"}}, role)
        assert off[off.index("--quantization") + 1] == "none"
    isvc = parse(make_isvc({"engine": {"performanceMode": "interactivity"}}))
    assert isvc.spec.engine.effective_quantization == "int8"


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
        "--served-name", "smollm2", "--log-format", "text", "--drain-seconds", "60",
        "--api-key-file", "/etc/splitserve/api-keys/api-keys",
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
        # The immutable selector uses only labels stable for the Deployment's life (an engine
        # Deployment is one generation: its rollout hash) and matches the pods.
        stable = {L.INSTANCE_LABEL: "chat", L.ROLE_LABEL: role}
        if role != L.ROUTER:
            stable[L.ROLLOUT_HASH_LABEL] = isvc.spec.rollout_hash
            assert template["metadata"]["labels"][L.ROLLOUT_HASH_LABEL] == isvc.spec.rollout_hash
        else:
            assert L.ROLLOUT_HASH_LABEL not in template["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == stable
        assert (
            dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        )
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
            # Ready only with engines to route to; alive whenever it answers at all.
            assert c["readinessProbe"]["httpGet"]["path"] == "/health"
            assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
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
    {"engine": {"quantization": "int8"}},
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
        ({"engine": {"quantization": "gguf"}}, True),
        ({"engine": {"quantization": "none"}}, False),  # the default, spelled out
        # a mode that quantizes changes the KV the engines write; one that does not, nothing
        ({"engine": {"performanceMode": "interactivity"}}, True),
        ({"engine": {"performanceMode": "interactivity", "quantization": "none"}}, False),
        ({"engine": {"performanceMode": "throughput"}}, False),
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


@pytest.mark.parametrize("prefill_replicas", [0, 1])
def test_pod_command_lines_parse_with_the_servers_own_flags(make_isvc, prefill_replicas) -> None:
    """Every command line the operator renders is accepted by the real `splitserve` parser of
    that subcommand (a flag the server does not know makes the pod crash-loop)."""
    import argparse
    import importlib

    from splitserve.cli import COMMANDS

    change = {"prefill": {"replicas": prefill_replicas}, "router": {"apiKeySecret": {"name": "k"}}}
    change["engine"] = {"quantization": "w8a8"}  # rendered as --quantization, which must parse
    objects = objects_of(make_isvc, change)
    deployments = [obj for key, obj in objects.items() if key.startswith("Deployment/")]
    assert deployments
    for dep in deployments:
        args = container(dep)["args"]
        parser = argparse.ArgumentParser(prog=f"splitserve {args[0]}", exit_on_error=False)
        importlib.import_module(COMMANDS[args[0]][0]).add_arguments(parser)
        parsed, unknown = parser.parse_known_args(args[1:])
        assert not unknown, f"{dep['metadata']['name']}: flags the server refuses: {unknown}"
        if args[0] != "router":
            assert parsed.quantization == "w8a8"


def test_each_generation_has_its_own_engine_deployments(make_isvc) -> None:
    """A new rollout hash is a new Deployment beside the old (never adopting its pods); engine
    settings that keep KV compatibility roll inside the same one; the router never rolls."""
    before = {o["metadata"]["name"]: o for o in build_desired(parse(make_isvc()))}
    after = {
        o["metadata"]["name"]: o
        for o in build_desired(parse(make_isvc({"model": {"revision": "v2"}})))
    }
    settings = {
        o["metadata"]["name"]
        for o in build_desired(parse(make_isvc({"engine": {"maxNumSeqs": 7}})))
    }
    engine = {n for n, o in before.items() if o["kind"] == "Deployment" and "router" not in n}
    new_engine = {n for n, o in after.items() if o["kind"] == "Deployment" and "router" not in n}
    assert len(engine) == 2 and not engine & new_engine
    assert engine <= settings
    for name in new_engine:
        selector = after[name]["spec"]["selector"]["matchLabels"]
        assert (
            selector[L.ROLLOUT_HASH_LABEL]
            == parse(make_isvc({"model": {"revision": "v2"}})).spec.rollout_hash
        )
    router = "chat-router"
    assert before[router]["spec"]["template"] == after[router]["spec"]["template"]


def test_observability_sets_log_format_and_the_otel_environment(make_isvc) -> None:
    """``spec.observability``: every server gets ``--log-format``; with a tracing endpoint,
    every pod gets the OpenTelemetry SDK's standard variables, named per role; without one,
    none (the servers then export nothing)."""
    plain = objects_of(make_isvc, {})
    traced = objects_of(
        make_isvc,
        {"observability": {"logFormat": "json", "tracing": {
            "endpoint": "http://otel.monitoring:4317", "samplingRatio": 0.25}}},
    )  # fmt: skip
    for key in (
        "Deployment/chat-prefill",
        "Deployment/chat-decode",
        "Deployment/chat-router",
    ):
        role = key.rsplit("-", 1)[1]
        before, after = container(plain[key]), container(traced[key])
        assert before["args"][before["args"].index("--log-format") + 1] == "text"
        assert after["args"][after["args"].index("--log-format") + 1] == "json"
        assert not [e for e in before["env"] if e["name"].startswith("OTEL_")]
        env = {e["name"]: e.get("value") for e in after["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel.monitoring:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        assert env["OTEL_SERVICE_NAME"] == f"chat-{role}"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert float(env["OTEL_TRACES_SAMPLER_ARG"]) == 0.25


@pytest.mark.parametrize(
    "bad",
    [{"logFormat": "xml"}, {"tracing": {"endpoint": "otel:4317"}},
     {"tracing": {"endpoint": "http://o:4317", "samplingRatio": 2}},
     {"tracing": {"endpoint": "http://o:4317", "protocol": "thrift"}}],
    ids=str,
)  # fmt: skip
def test_bad_observability_is_a_spec_error_naming_the_field(make_isvc, bad) -> None:
    from splitserve.operator.spec import SpecError

    with pytest.raises(SpecError) as err:
        parse(make_isvc({"observability": bad}))
    assert "spec.observability" in str(err.value)
