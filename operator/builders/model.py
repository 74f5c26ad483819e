"""The model's volumes, mounts and download step in an engine pod (see operator/model_source.py).

A download (hf://, s3://) is an init container running `splitserve pull-model`: it writes the
weights into the cache volume and exits, so the engine container starts only with complete
weights (readiness then waits for the engine to load them), and a failed download is a failed
init container whose last log lines status reports. Only the download step gets the
credentials Secret; the engine mounts the cache read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splitserve.operator.builders import pod
from splitserve.operator.model_source import CACHE_MOUNT, IMAGE_MOUNT
from splitserve.operator.spec import InferenceService

DOWNLOAD_CONTAINER = "model-download"
MODEL_VOLUME = "model"
CACHE_VOLUME = "model-cache"
# The download step's own resources: network and disk bound, one core at most.
DOWNLOAD_RESOURCES = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


@dataclass(frozen=True)
class ModelMounts:
    """What an engine pod needs for its model: volumes, the engine's mounts, init containers."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    init_containers: list[dict[str, Any]] = field(default_factory=list)


def model_mounts(isvc: InferenceService) -> ModelMounts:
    m = isvc.spec.model
    if m.pvc_claim is not None:
        volume = {
            "name": MODEL_VOLUME,
            "persistentVolumeClaim": {"claimName": m.pvc_claim, "readOnly": True},
        }
        mount = {"name": MODEL_VOLUME, "mountPath": f"/models/{m.pvc_claim}", "readOnly": True}
        return ModelMounts([volume], [mount])
    if m.oci_reference is not None:
        # A Kubernetes image volume (GA in 1.36): the runtime pulls the image with the pod's
        # pull secrets and mounts its filesystem read-only, no container of it ever runs.
        volume = {
            "name": MODEL_VOLUME,
            "image": {"reference": m.oci_reference, "pullPolicy": isvc.spec.image_pull_policy},
        }
        mount = {"name": MODEL_VOLUME, "mountPath": IMAGE_MOUNT, "readOnly": True}
        return ModelMounts([volume], [mount])
    if m.needs_download:
        volume = {"name": CACHE_VOLUME, **_cache_source(isvc)}
        mount = {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": True}
        return ModelMounts([volume], [mount], [_download_container(isvc)])
    return ModelMounts()


def _cache_source(isvc: InferenceService) -> dict[str, Any]:
    cache = isvc.spec.model.cache
    if cache.claim_name:
        return {"persistentVolumeClaim": {"claimName": cache.claim_name}}
    if cache.host_path:
        return {"hostPath": {"path": cache.host_path, "type": "Directory"}}
    return {"emptyDir": {}}


def download_args(isvc: InferenceService) -> list[str]:
    """`splitserve pull-model URI --dest DIR [--revision R]`."""
    m = isvc.spec.model
    args = ["pull-model", m.uri, "--dest", m.cache_dir]
    if m.revision:
        args += ["--revision", m.revision]
    return args + ["--log-format", isvc.spec.observability.log_format]


def _download_container(isvc: InferenceService) -> dict[str, Any]:
    m = isvc.spec.model
    env = pod.base_env()
    if m.endpoint:
        name = "HF_ENDPOINT" if m.scheme == "hf" else "AWS_ENDPOINT_URL"
        env.append({"name": name, "value": m.endpoint})
    container: dict[str, Any] = {
        "name": DOWNLOAD_CONTAINER,
        **pod.image_fields(isvc),
        "args": download_args(isvc),
        "env": env,
        "resources": {k: dict(v) for k, v in DOWNLOAD_RESOURCES.items()},
        "securityContext": pod.container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": pod.scratch_mounts() + [{"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT}],
    }
    if m.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": m.credentials_secret}}]
    return container
