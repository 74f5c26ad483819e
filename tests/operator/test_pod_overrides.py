"""Per-role pass-through: what a platform team adds reaches exactly that role's pods, valid."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.operator import labels as L
from splitserve.operator.builders import build_desired
from splitserve.operator.pod_overrides import (
    RESERVED_MOUNT_PATHS,
    RESERVED_MOUNT_PREFIXES,
    RESERVED_VOLUME_PREFIXES,
    RESERVED_VOLUMES,
)
from splitserve.operator.spec import parse

EVERYTHING = {
    "env": [
        {"name": "HF_HOME", "value": "/data/hf"},  # replaces the operator's value
        {"name": "TEAM", "value": "search"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "tuning"}, "prefix": "TUNE_"}],
    "volumes": [{"name": "extra", "configMap": {"name": "extra-files"}}],
    "volumeMounts": [{"name": "extra", "mountPath": "/etc/extra", "readOnly": True}],
    "priorityClassName": "llm-serving",
    "runtimeClassName": "nvidia",
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
         "whenUnsatisfiable": "ScheduleAnyway"},
    ],
    "podAnnotations": {"team.example/owner": "search"},
    "podLabels": {"team": "search"},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}},
}  # fmt: skip


def deployments(isvc) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["labels"][L.ROLE_LABEL]: o
        for o in build_desired(isvc)
        if o["kind"] == "Deployment"
    }


def main_container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("role", ["prefill", "decode", "router"])
def test_each_field_reaches_only_its_role(make_isvc, validate_k8s, role) -> None:
    extra = dict(EVERYTHING) | ({"shmSize": "8Gi"} if role != "router" else {})
    isvc = parse(make_isvc({role: extra}))
    objects = build_desired(isvc)
    assert validate_k8s(objects) == []
    deps = deployments(isvc)
    dep = deps[role]
    pod, c = dep["spec"]["template"]["spec"], main_container(dep)
    meta = dep["spec"]["template"]["metadata"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"] == {"name": "HF_HOME", "value": "/data/hf"}
    assert [e["name"] for e in c["env"]].count("HF_HOME") == 1  # SSA keys env by name
    assert env["TEAM"]["value"] == "search" and "secretKeyRef" in env["TOKEN"]["valueFrom"]
    assert c["envFrom"] == EVERYTHING["envFrom"]
    assert {"name": "extra", "configMap": {"name": "extra-files"}} in pod["volumes"]
    assert EVERYTHING["volumeMounts"][0] in c["volumeMounts"]
    assert pod["priorityClassName"] == "llm-serving" and pod["runtimeClassName"] == "nvidia"
    (spread,) = pod["topologySpreadConstraints"]
    # No labelSelector given: the role's own pods are spread.
    assert spread["labelSelector"] == {
        "matchLabels": {L.INSTANCE_LABEL: "chat", L.ROLE_LABEL: role}
    }
    assert "affinity" not in pod  # the constraints replace the default anti-affinity
    assert meta["labels"]["team"] == "search" and meta["labels"][L.ROLE_LABEL] == role
    assert meta["annotations"]["team.example/owner"] == "search"
    account = next(
        o for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == pod["serviceAccountName"]
    )  # fmt: skip
    assert account["metadata"]["annotations"] == EVERYTHING["serviceAccount"]["annotations"]
    if role != "router":
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    for other, dep in deps.items():
        if other == role:
            continue
        other_pod = dep["spec"]["template"]["spec"]
        assert "priorityClassName" not in other_pod, other
        assert "team" not in dep["spec"]["template"]["metadata"]["labels"], other
        assert "TEAM" not in {e["name"] for e in main_container(dep)["env"]}, other


def test_default_shm_is_one_gibibyte(make_isvc) -> None:
    for role, dep in deployments(parse(make_isvc())).items():
        if role == L.ROUTER:
            continue
        shm = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["sizeLimit"] == "1Gi"


def test_engine_service_account_merges_both_roles(make_isvc) -> None:
    isvc = parse(
        make_isvc(
            {
                "prefill": {"serviceAccount": {"annotations": {"a": "1", "shared": "s"}}},
                "decode": {"serviceAccount": {"annotations": {"b": "2", "shared": "s"}}},
            }
        )
    )
    (account,) = [
        o for o in build_desired(isvc)
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "chat-engine"
    ]  # fmt: skip
    assert account["metadata"]["annotations"] == {"a": "1", "b": "2", "shared": "s"}


def test_reserved_names_cover_every_built_volume_and_mount(make_isvc) -> None:
    """The spec check refuses overrides on these names and paths; they must be all we use."""
    sources = ["pvc://weights/m", "hf://o/n", "oci://ghcr.io/a/m:1", "file:///m"]
    adapters = [{"name": "sql", "uri": "pvc://loras/sql"}, {"name": "chat", "uri": "file:///a/c"}]
    for uri in sources:
        change = {"model": {"uri": uri}, "router": {"apiKeySecret": {"name": "k"}},
                  "adapters": adapters}  # fmt: skip
        for dep in deployments(parse(make_isvc(change))).values():
            pod = dep["spec"]["template"]["spec"]
            for v in pod["volumes"]:
                reserved = v["name"] in RESERVED_VOLUMES
                assert reserved or v["name"].startswith(RESERVED_VOLUME_PREFIXES), (uri, v)
            for c in pod["containers"] + pod.get("initContainers", []):
                for m in c["volumeMounts"]:
                    path = m["mountPath"]
                    assert (
                        path in RESERVED_MOUNT_PATHS
                        or path.startswith("/models/")
                        or path.startswith(RESERVED_MOUNT_PREFIXES)
                    ), (uri, m)


def test_gpu_pools_get_the_device_and_the_gpu_toleration(make_isvc) -> None:
    gpu = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    isvc = parse(make_isvc({"prefill": gpu, "decode": gpu | {"runtimeClassName": "nvidia"}}))
    deps = deployments(isvc)
    for role in ("prefill", "decode"):
        pod, c = deps[role]["spec"]["template"]["spec"], main_container(deps[role])
        assert c["args"][c["args"].index("--device") + 1] == "cuda"
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    assert deps["decode"]["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert "tolerations" not in deps["router"]["spec"]["template"]["spec"]
    # Given tolerations and an explicit --device win.
    own = {"key": "gpu-pool", "operator": "Exists", "effect": "NoSchedule"}
    isvc = parse(
        make_isvc(
            {
                "decode": gpu | {"tolerations": [own]},
                "engine": {"extraArgs": ["--device", "cuda:1"]},
            }
        )
    )
    dep = deployments(isvc)["decode"]
    assert dep["spec"]["template"]["spec"]["tolerations"] == [own]
    assert main_container(dep)["args"].count("--device") == 1
    # CPU pools: neither.
    cpu = deployments(parse(make_isvc()))["decode"]
    assert "--device" not in main_container(cpu)["args"]
    assert "tolerations" not in cpu["spec"]["template"]["spec"]


def test_prometheus_annotations_name_each_role_s_metrics_port(make_isvc) -> None:
    deps = deployments(parse(make_isvc()))
    ports = {"prefill": "9090", "decode": "9090", "router": "8000"}
    for role, dep in deps.items():
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == ports[role]
        assert annotations["prometheus.io/path"] == "/metrics"
        named = {p["name"]: str(p["containerPort"]) for p in main_container(dep)["ports"]}
        assert ports[role] in named.values()
    off = {"observability": {"metrics": {"prometheusAnnotations": False}}}
    for dep in deployments(parse(make_isvc(off))).values():
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        assert not any(k.startswith("prometheus.io/") for k in annotations)


def test_network_policy_admits_the_monitoring_namespace_to_metrics_only(
    make_isvc, validate_k8s
) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    isvc = parse(make_isvc({"observability": {"metrics": {"allowFrom": [peer]}}}))
    objects = build_desired(isvc)
    assert validate_k8s(objects) == []
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    *_, metrics = policy["spec"]["ingress"]
    assert metrics == {"from": [peer], "ports": [{"protocol": "TCP", "port": 9090}]}
    default = next(o for o in build_desired(parse(make_isvc())) if o["kind"] == "NetworkPolicy")
    assert len(default["spec"]["ingress"]) == 2
