"""Helm charts with the real helm binary: lint, template, and validate what they render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import helm_run

from splitserve.operator import crd
from splitserve.operator.builders import build_desired
from splitserve.operator.spec import parse

REPO = Path(__file__).resolve().parents[2]
OPERATOR_CHART = REPO / "charts" / "splitserve-operator"
ISVC_CHART = REPO / "charts" / "inferenceservice"

OPERATOR_VALUES = {
    "default": [],
    "namespaced": [
        "--set", "watchNamespaces={team-a,team-b}", "--set", "reconcileInterval=10",
        "--set", "serviceAccount.name=ops", "--set", "image.tag=0.2.0",
        "--set", "imagePullSecrets[0].name=regcred", "--set", "nodeSelector.pool=system",
        "--set", "priorityClassName=system-cluster-critical",
    ],
}  # fmt: skip
ISVC_VALUES = {
    "default": [],
    "colocated": ["--set", "prefill.replicas=0", "--set", "kvTransfer.transport=grpc"],
    "disaggregated": [
        "--set", "name=llama", "--set", "model.uri=pvc://weights/llama",
        "--set", "model.revision=abc", "--set", "decode.replicas=4",
        "--set", "router.apiKeySecret.name=keys", "--set", "router.service.type=LoadBalancer",
        "--set", "decode.resources.limits.nvidia\\.com/gpu=1", "--set", "rollout.maxSurge=25%",
        "--set", "engine.extraArgs={--enforce-eager}",
    ],
    "platform": [
        "--set", "model.uri=hf://org/gated", "--set", "model.credentials.secretName=hf-token",
        "--set", "model.cache.claimName=model-cache", "--set", "model.endpoint=http://mirror:80",
        "--set-json", 'decode.env=[{"name": "TEAM", "value": "a"}]',
        "--set-json", 'decode.envFrom=[{"configMapRef": {"name": "tuning"}}]',
        "--set-json", 'decode.volumes=[{"name": "x", "emptyDir": {}}]',
        "--set-json", 'decode.volumeMounts=[{"name": "x", "mountPath": "/x"}]',
        "--set", "decode.priorityClassName=high", "--set", "router.runtimeClassName=gvisor",
        "--set", "decode.shmSize=4Gi", "--set", "decode.podLabels.team=a",
        "--set-json", 'observability.metrics.allowFrom=[{"namespaceSelector": {}}]',
    ],
}  # fmt: skip


def template(helm: str, chart: Path, values: list[str]) -> list[dict[str, Any]]:
    done = helm_run(helm, "template", "rel", str(chart), "-n", "ns", "--include-crds", *values)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("chart", [OPERATOR_CHART, ISVC_CHART], ids=lambda p: p.name)
def test_helm_lint(helm, chart) -> None:
    done = helm_run(helm, "lint", "--strict", str(chart))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("case", OPERATOR_VALUES)
def test_operator_chart_renders_valid_objects(helm, validate_k8s, case) -> None:
    objects = template(helm, OPERATOR_CHART, OPERATOR_VALUES[case])
    assert validate_k8s(objects) == []
    kinds = sorted(o["kind"] for o in objects)
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["args"][:2] == ["operator", "run"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    # Two replicas under a Lease in the release namespace, which only the Lease role reaches.
    assert deployment["spec"]["replicas"] == 2 and "--leader-elect" in c["args"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    (lease_role,) = [o for o in objects if o["kind"] == "Role"]
    assert lease_role["metadata"]["namespace"] == "ns"
    assert {g for r in lease_role["rules"] for g in r["apiGroups"]} == {"coordination.k8s.io"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080"
    assert "PodDisruptionBudget" in kinds
    bindings = [
        b for b in bindings if b["metadata"]["name"] != "rel-splitserve-operator-leader-election"
    ]
    if case == "namespaced":
        assert c["args"].count("--namespace") == 2
        namespaced = [b for b in bindings if b["kind"] == "RoleBinding"]
        assert sorted(b["metadata"]["namespace"] for b in namespaced) == ["team-a", "team-b"]
        assert c["image"].endswith(":0.2.0")
    else:
        assert "--namespace" not in c["args"]
        assert len([b for b in bindings if b["kind"] == "ClusterRoleBinding"]) == 2


def test_operator_chart_refuses_replicas_without_leader_election(helm) -> None:
    done = helm_run(
        helm, "template", "rel", str(OPERATOR_CHART), "--set", "leaderElection.enabled=false"
    )
    assert done.returncode != 0 and "needs leaderElection.enabled" in done.stderr
    one = ["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"]
    objects = template(helm, OPERATOR_CHART, one)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not [o for o in objects if o["kind"] in ("Role", "PodDisruptionBudget")]


def test_operator_chart_schema_rejects_bad_values(helm) -> None:
    done = helm_run(helm, "lint", str(OPERATOR_CHART), "--set", "reconcileInterval=-1")
    assert done.returncode != 0 and "reconcileInterval" in done.stdout + done.stderr
    done = helm_run(helm, "lint", str(OPERATOR_CHART), "--set", "imagee.tag=x")
    assert done.returncode != 0


@pytest.mark.parametrize("case", ISVC_VALUES)
def test_inferenceservice_chart_renders_a_valid_resource(helm, validate_k8s, case) -> None:
    (isvc,) = template(helm, ISVC_CHART, ISVC_VALUES[case])
    assert crd.validate(isvc) == []
    # What the operator would create from it is valid too.
    assert validate_k8s(build_desired(parse(isvc))) == []
    if case == "colocated":
        assert isvc["spec"]["prefill"]["replicas"] == 0
    if case == "disaggregated":
        assert isvc["metadata"]["name"] == "llama"
        assert isvc["spec"]["router"]["apiKeySecret"] == {"name": "keys"}
    if case == "platform":
        spec = isvc["spec"]
        assert spec["model"]["cache"] == {"claimName": "model-cache"}
        assert spec["decode"]["env"] == [{"name": "TEAM", "value": "a"}]
        assert spec["decode"]["shmSize"] == "4Gi" and spec["router"]["runtimeClassName"] == "gvisor"
    else:  # empty pass-through values are left out, the CRD's defaults apply
        assert "env" not in isvc["spec"]["decode"] and "credentials" not in isvc["spec"]["model"]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (["--set", "engine.blockSize=12"], "blockSize"),
        (["--set", "kvTransfer.transport=tcp"], "transport"),
        (["--set", "model.uri=ftp://x/y"], "uri"),
        (["--set", "router.polcy=prefix"], "polcy"),
    ],
)
def test_inferenceservice_chart_schema_rejects_bad_values(helm, values, field) -> None:
    done = helm_run(helm, "template", "rel", str(ISVC_CHART), *values)
    assert done.returncode != 0 and field in done.stderr


def _strip_kubernetes_keys(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_kubernetes_keys(v) for k, v in schema.items() if not k.startswith("x-")}
    if isinstance(schema, list):
        return [_strip_kubernetes_keys(v) for v in schema]
    return schema


def _without(schema: Any, key: str) -> Any:
    if isinstance(schema, dict):
        return {k: _without(v, key) for k, v in schema.items() if k != key}
    if isinstance(schema, list):
        return [_without(v, key) for v in schema]
    return schema


def test_inferenceservice_values_schema_is_the_crd_spec_schema() -> None:
    values_schema = json.loads((ISVC_CHART / "values.schema.json").read_text())
    spec_schema = crd.openapi_schema()["properties"]["spec"]["properties"]
    for field, sub in spec_schema.items():
        ours = values_schema["properties"][field]
        theirs = _strip_kubernetes_keys(sub)
        if field == "router":  # values may leave apiKeySecret empty ({}); the template drops it
            theirs["properties"]["apiKeySecret"].pop("required")
        if field == "model":  # the same for credentials
            theirs["properties"]["credentials"].pop("required")
        strip = ("required", "additionalProperties")
        for key in strip:
            ours, theirs = _without(ours, key), _without(theirs, key)
        assert ours == theirs, field


def test_inferenceservice_values_defaults_match_the_crd() -> None:
    values = yaml.safe_load((ISVC_CHART / "values.yaml").read_text())
    spec = {k: v for k, v in values.items() if k not in ("name", "labels", "annotations")}
    defaulted = crd.apply_defaults({"spec": {"model": {"uri": "x"}, "image": "i"}})["spec"]
    for section in ("engine", "kvTransfer", "rollout"):
        assert spec[section] == defaulted[section], section
    assert spec["router"]["policy"] == defaulted["router"]["policy"]
    assert spec["prefill"]["replicas"] == defaulted["prefill"]["replicas"]
    assert spec["decode"]["replicas"] == defaulted["decode"]["replicas"]


def test_every_value_is_documented() -> None:
    """Each key has a comment right above it, or sits inside a documented parent."""
    for chart in (OPERATOR_CHART, ISVC_CHART):
        lines = (chart / "values.yaml").read_text().splitlines()
        parents: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
        for index, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or ":" not in stripped:
                continue
            indent = len(line) - len(line.lstrip())
            while parents and parents[-1][0] >= indent:
                parents.pop()
            commented = lines[index - 1].strip().startswith("#")
            documented = commented or any(doc for _, doc in parents)
            leaf = not stripped.endswith(":")
            assert documented or not leaf, (chart.name, line)
            parents.append((indent, documented))


def _script(name: str, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_chart_readmes_list_every_documented_value() -> None:
    done = _script("chart-docs", "--check")
    assert done.returncode == 0, "run scripts/chart-docs: " + done.stderr
    for chart in (OPERATOR_CHART, ISVC_CHART):
        readme = (chart / "README.md").read_text()
        values = yaml.safe_load((chart / "values.yaml").read_text())
        for key in values:
            if key != "global":
                assert f"`{key}" in readme, (chart.name, key)


def test_values_schema_is_the_crd_s(tmp_path) -> None:
    done = _script("sync-chart-schema", "--check")
    assert done.returncode == 0, "run scripts/sync-chart-schema"


def test_charts_package_with_their_readme_and_crd(helm, tmp_path) -> None:
    import tarfile

    for chart in (OPERATOR_CHART, ISVC_CHART):
        done = helm_run(helm, "package", str(chart), "-d", str(tmp_path))
        assert done.returncode == 0, done.stderr
    packaged = {p.name: p for p in tmp_path.glob("*.tgz")}
    assert set(packaged) == {"splitserve-operator-0.1.0.tgz", "inferenceservice-0.1.0.tgz"}
    with tarfile.open(packaged["splitserve-operator-0.1.0.tgz"]) as tar:
        names = set(tar.getnames())
    assert {"splitserve-operator/README.md",
            "splitserve-operator/crds/inferenceservices.yaml"} <= names  # fmt: skip
