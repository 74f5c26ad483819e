"""Shared fixtures for the operator tests: spec factory, Kubernetes schema check, tool paths."""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from splitserve.operator import crd

REPO = Path(__file__).resolve().parents[2]
# helm_support.py, shared by the chart tests (--import-mode=importlib adds no test dir to the path)
sys.path.insert(0, str(Path(__file__).parent))
K8S_VERSION = "1.30.0"

BASE_ISVC: dict[str, Any] = {
    "apiVersion": "serving.splitserve.io/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "ml", "uid": "1234-uid", "generation": 3},
    "spec": {
        "model": {"uri": "pvc://weights/smollm2", "revision": "abc123"},
        "image": "registry.example/splitserve:0.1.0",
        "prefill": {"replicas": 1},
        "decode": {"replicas": 2},
    },
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def make_isvc() -> Callable[..., dict[str, Any]]:
    """An InferenceService dict: the base one with ``spec`` / ``metadata`` merged in."""

    def make(spec: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
        return _merge(BASE_ISVC, {"spec": spec or {}, **top})

    return make


def k8s_errors(objects: list[dict[str, Any]], version: str = K8S_VERSION) -> list[str]:
    """kubernetes-validate --strict for Kubernetes 1.30 (or ``version``) on every built-in
    object."""
    errors = []
    for obj in objects:
        if obj.get("apiVersion") == crd.API_VERSION:
            errors += [str(e) for e in crd.validate(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {exc.message}")
    return errors


@pytest.fixture
def validate_k8s() -> Callable[[list[dict[str, Any]]], list[str]]:
    return k8s_errors


def _tool(name: str) -> str:
    path = REPO / ".cache" / "tools" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run `make tools` (scripts/install-tools.sh)")
    return found


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary from scripts/install-tools.sh (skips the test if it is missing)."""
    return _tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _tool("kubectl")
