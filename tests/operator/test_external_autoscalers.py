"""The inferenceservice chart's external autoscaler examples (HPA, KEDA ScaledObject): valid
for their APIs (kubernetes-validate, KEDA's own CRD schema, vendored in data/), aimed at the
InferenceService's scale subresource, on metrics the servers really export, and refused unless
the operator is told to leave decode's size to them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from helm_support import helm_run
from test_monitoring import _unknown_fields

from splitserve.operator import crd
from splitserve.operator import labels as L
from splitserve.operator.autoscale.controller import managed_roles
from splitserve.operator.spec import parse

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "inferenceservice"
DATA = Path(__file__).resolve().parent / "data"
EXTERNAL_DECODE = [
    "--set", "decode.autoscaling.external=true", "--set", "decode.autoscaling.minReplicas=0",
    "--set", "decode.autoscaling.maxReplicas=8",
]  # fmt: skip


def render(helm: str, *values: str) -> list[dict[str, Any]]:
    done = helm_run(helm, "template", "chat", str(CHART), "-n", "ml", *values)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def keda_schema() -> dict[str, Any]:
    doc = yaml.safe_load((DATA / "keda.sh_scaledobjects.yaml").read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]


def exported_series() -> set[str]:
    """Every series name the engines and the router export (what the queries may name)."""
    from prometheus_client import CollectorRegistry
    from test_autoscale import Engine

    from splitserve.services.common.metrics import EngineMetrics
    from splitserve.services.router.metrics import RouterMetrics

    names = set()
    for registry in (EngineMetrics(CollectorRegistry(), Engine(), "m", "decode").registry,
                     RouterMetrics().registry):  # fmt: skip
        names |= {f.name for f in registry.collect()}
    return names


def aims_at_the_scale_subresource(ref: dict[str, Any], isvc: dict[str, Any]) -> None:
    assert ref == {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": isvc["metadata"]["name"],
    }
    scale = crd.load_crd()["spec"]["versions"][0]["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.decode.replicas"


def test_hpa_example_is_valid_and_scales_decode(helm, validate_k8s) -> None:
    objects = render(helm, "--set", "externalAutoscaler.hpa.enabled=true", *EXTERNAL_DECODE)
    hpa, isvc = one(objects, "HorizontalPodAutoscaler"), one(objects, crd.KIND)
    assert validate_k8s([hpa, isvc]) == []
    aims_at_the_scale_subresource(hpa["spec"]["scaleTargetRef"], isvc)
    (metric,) = hpa["spec"]["metrics"]
    # The adapter serves vllm:num_requests_running under a name without the colon.
    assert metric["pods"]["metric"]["name"].replace("_", ":", 1) in exported_series()
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # The operator leaves decode's replicas to the HPA.
    assert managed_roles(parse(isvc)) == ()


def test_keda_example_is_valid_for_keda_and_wakes_from_zero(helm) -> None:
    objects = render(helm, "--set", "externalAutoscaler.keda.enabled=true", *EXTERNAL_DECODE)
    scaled, isvc = one(objects, "ScaledObject"), one(objects, crd.KIND)
    schema = keda_schema()
    jsonschema.Draft7Validator(schema).validate(scaled)
    assert _unknown_fields(scaled, schema) == []
    aims_at_the_scale_subresource(scaled["spec"]["scaleTargetRef"], isvc)
    assert scaled["spec"]["minReplicaCount"] == 0
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    named = {n for q in queries for n in re.findall(r"([a-z_:]+)\{", q)}
    assert named == {"vllm:num_requests_running", "splitserve_router_cold_start_waiting"}
    assert named <= exported_series()
    assert all('inferenceservice="chat"' in q for q in queries)
    # minReplicas 0: the router holds requests while KEDA brings a pod up.
    parsed = parse(isvc)
    assert parsed.spec.scale_from_zero and managed_roles(parsed) == ()


@pytest.mark.parametrize("which", ["hpa", "keda"])
def test_an_external_autoscaler_needs_the_operator_to_step_aside(helm, which) -> None:
    done = helm_run(helm, "template", "chat", str(CHART),
                    "--set", f"externalAutoscaler.{which}.enabled=true")  # fmt: skip
    assert done.returncode != 0
    assert "decode.autoscaling.external: true" in done.stderr


def test_operator_autoscaling_values_reach_the_resource(helm) -> None:
    objects = render(
        helm,
        "--set", "decode.autoscaling.maxReplicas=6", "--set", "decode.autoscaling.minReplicas=0",
        "--set", "decode.autoscaling.targets.concurrency=8",
        "--set", "prefill.autoscaling.maxReplicas=3",
        "--set", "autoscaling.policy=FixedRatio", "--set-json", "autoscaling.prefillPerDecode=0.5",
        "--set", "drainSeconds=90",
    )  # fmt: skip
    isvc = one(objects, crd.KIND)
    assert crd.validate(isvc) == []
    spec = parse(isvc).spec
    assert spec.decode.autoscaling is not None and spec.decode.autoscaling.targets.concurrency == 8
    assert spec.autoscaling.prefill_per_decode == 0.5 and spec.drain_seconds == 90
    assert managed_roles(parse(isvc)) == (L.PREFILL, L.DECODE)
