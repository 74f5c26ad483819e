"""Model sources as pods see them: the download step, the caches, image volumes, served names."""

from __future__ import annotations

from typing import Any

import pytest
from test_pod_overrides import deployments, main_container  # noqa: I001 - a sibling module

from splitserve.operator import labels as L
from splitserve.operator.builders import build_desired
from splitserve.operator.spec import parse


def engine_pod(make_isvc, model: dict[str, Any], validate_k8s=None, version="1.30.0"):
    isvc = parse(make_isvc({"model": model}))
    objects = build_desired(isvc)
    if validate_k8s is not None:
        assert validate_k8s(objects, version) == []
    return isvc, deployments(isvc)["decode"]["spec"]["template"]["spec"]


def test_hf_download_is_an_init_step_with_the_token_only_there(make_isvc, validate_k8s) -> None:
    model = {
        "uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
        "revision": "0e9e39f249a16976918f6564b8830bc894c89659",
        "credentials": {"secretName": "hf-token"},
        "endpoint": "https://hf-mirror.example",
        "cache": {"claimName": "model-cache"},
    }
    isvc, pod = engine_pod(make_isvc, model, validate_k8s)
    (init,) = pod["initContainers"]
    target = "/models/cache/hf/meta-llama/Llama-3.1-8B-Instruct/" + model["revision"]
    assert init["name"] == "model-download"
    assert init["args"] == [
        "pull-model", model["uri"], "--dest", target, "--revision", model["revision"],
        "--log-format", "text",
    ]  # fmt: skip
    assert init["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert {"name": "HF_ENDPOINT", "value": "https://hf-mirror.example"} in init["env"]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "model-cache", "mountPath": "/models/cache"} in init["volumeMounts"]
    engine = pod["containers"][0]
    assert "envFrom" not in engine  # the engines never see the token
    assert {"name": "model-cache", "mountPath": "/models/cache", "readOnly": True} in engine[
        "volumeMounts"
    ]
    assert engine["args"][engine["args"].index("--model") + 1] == target
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"] == {"claimName": "model-cache"}


@pytest.mark.parametrize(
    ("cache", "source"),
    [
        ({}, {"emptyDir": {}}),
        ({"claimName": "shared"}, {"persistentVolumeClaim": {"claimName": "shared"}}),
        (
            {"hostPath": "/var/lib/models"},
            {"hostPath": {"path": "/var/lib/models", "type": "Directory"}},
        ),
    ],
)
def test_cache_volume(make_isvc, cache, source) -> None:
    _, pod = engine_pod(make_isvc, {"uri": "hf://o/n", "cache": cache})
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert {k: v for k, v in volume.items() if k != "name"} == source


def test_s3_download_uses_the_endpoint_and_credentials(make_isvc, validate_k8s) -> None:
    model = {
        "uri": "s3://models/llama/8b",
        "endpoint": "http://minio.storage:9000",
        "credentials": {"secretName": "s3-creds"},
    }
    _, pod = engine_pod(make_isvc, model, validate_k8s)
    (init,) = pod["initContainers"]
    assert init["args"][:4] == [
        "pull-model",
        "s3://models/llama/8b",
        "--dest",
        "/models/cache/s3/models/llama/8b",
    ]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"} in init["env"]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_oci_model_is_an_image_volume_in_modelcar_layout(make_isvc, validate_k8s) -> None:
    # Image volumes are Kubernetes 1.31+ (GA in 1.36): validated against 1.36.
    model = {"uri": "oci://ghcr.io/acme/models/smollm2:1.0"}
    _, pod = engine_pod(make_isvc, model, validate_k8s, version="1.36.0")
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["image"] == {
        "reference": "ghcr.io/acme/models/smollm2:1.0",
        "pullPolicy": "IfNotPresent",
    }
    engine = pod["containers"][0]
    assert {"name": "model", "mountPath": "/models/image", "readOnly": True} in engine[
        "volumeMounts"
    ]
    assert engine["args"][engine["args"].index("--model") + 1] == "/models/image/models"
    assert "initContainers" not in pod


def test_sources_without_download_have_no_init_step(make_isvc) -> None:
    for uri in ("pvc://w/m", "file:///m", "oci://r.example/m:1"):
        _, pod = engine_pod(make_isvc, {"uri": uri})
        assert "initContainers" not in pod, uri


@pytest.mark.parametrize(
    ("model", "names"),
    [
        ({"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
         ["HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"]),
        ({"uri": "hf://o/n", "servedName": "chat"}, ["chat"]),
        ({"uri": "pvc://w/llama-8b"}, ["llama-8b"]),
        ({"uri": "oci://ghcr.io/acme/smollm2:1.0@sha256:" + "a" * 64}, ["smollm2"]),
        ({"uri": "s3://bkt/p/llama/", "aliases": ["llama", "default"]}, ["llama", "default"]),
    ],
)  # fmt: skip
def test_served_name_defaults_to_the_hub_id_with_the_short_name_as_alias(
    make_isvc, model, names
) -> None:
    isvc = parse(make_isvc({"model": model}))
    deps = deployments(isvc)
    args = main_container(deps[L.ROUTER])["args"]
    served = [args[i + 1] for i, a in enumerate(args) if a == "--served-name"]
    assert served == names
    engine = main_container(deps["decode"])["args"]
    assert engine[engine.index("--served-name") + 1] == names[0]
