"""Kustomize bases, CRD copies, RBAC parity, the Dockerfile and the docs' health check."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitserve.operator import crd
from splitserve.operator.builders import build_desired, pod
from splitserve.operator.spec import parse

REPO = Path(__file__).resolve().parents[2]
CRD_COPIES = [
    REPO / "charts" / "splitserve-operator" / "crds" / "inferenceservices.yaml",
    REPO / "manifests" / "base" / "crd.yaml",
]


def kustomize(kubectl: str, folder: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl, "kustomize", str(REPO / folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("path", CRD_COPIES, ids=lambda p: str(p.relative_to(REPO)))
def test_crd_copies_equal_the_package_crd(path) -> None:
    assert path.read_text() == crd.crd_text(), "regenerate: splitserve operator crd > " + str(path)


def test_operator_base_is_valid(kubectl, validate_k8s) -> None:
    objects = kustomize(kubectl, "manifests/base")
    assert validate_k8s(objects) == []
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole"} <= kinds
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == "splitserve-system"
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/splitserve/splitserve:0.1.0"
    assert c["args"][:2] == ["operator", "run"]


def test_examples_render_into_valid_objects(kubectl, validate_k8s) -> None:
    examples = kustomize(kubectl, "manifests/examples")
    assert {o["metadata"]["name"] for o in examples} == {"smollm2", "smollm2-1p2d"}
    for isvc in examples:
        assert crd.validate(isvc) == []
        objects = build_desired(parse(isvc))
        assert validate_k8s(objects) == []
    colocated = next(o for o in examples if o["metadata"]["name"] == "smollm2")
    assert parse(colocated).spec.colocated


def _rules(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {
        o["metadata"]["name"].split("operator")[-1]: o["rules"]
        for o in objects
        if o["kind"] == "ClusterRole"
    }


def test_chart_and_kustomize_grant_the_same_rights(helm, kubectl) -> None:
    done = subprocess.run(
        [helm, "template", "splitserve", str(REPO / "charts" / "splitserve-operator")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    chart = _rules([d for d in yaml.safe_load_all(done.stdout) if d])
    base = _rules(kustomize(kubectl, "manifests/base"))
    assert chart == base and set(base) == {"", "-cluster"}


def test_operator_can_grant_what_routers_need(make_isvc) -> None:
    """RBAC escalation check: the operator must hold every right it puts in a router Role."""
    base = yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text())
    held = {
        (group, resource, verb)
        for doc in base
        if doc["kind"] == "ClusterRole"
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    role = next(o for o in build_desired(parse(make_isvc())) if o["kind"] == "Role")
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert (group, resource, verb) in held


def test_dockerfile_runs_splitserve_as_the_pods_user() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^USER {pod.RUN_AS_USER}:{pod.RUN_AS_USER}$", text, re.M)
    assert re.search(rf"--uid {pod.RUN_AS_USER}\b", text)
    assert 'ENTRYPOINT ["splitserve"]' in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and ".cache" in ignored
