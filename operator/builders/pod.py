"""Pieces every pod shares: secure defaults, writable scratch volumes, scheduling.

The image runs as this non-root user (see the Dockerfile); the root filesystem is read-only, so
anything that writes (/tmp, the HOME cache, the Hugging Face cache) gets an emptyDir.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splitserve.operator.pod_overrides import gpu_count, merge_env, spread_constraints
from splitserve.operator.spec import InferenceService, PoolSpec

RUN_AS_USER = 10001  # must match the Dockerfile's USER
HOME = "/home/splitserve"
CACHE_DIR = f"{HOME}/.cache"


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def scratch_volumes() -> list[dict[str, Any]]:
    return [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]


def scratch_mounts() -> list[dict[str, Any]]:
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]


def base_env() -> list[dict[str, Any]]:
    return [
        {"name": "HOME", "value": HOME},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def observability_env(isvc: InferenceService, role: str) -> list[dict[str, Any]]:
    """The OpenTelemetry SDK's standard variables when the spec asks for traces (the servers
    export only when an endpoint is set)."""
    t = isvc.spec.observability.tracing
    if t is None:
        return []
    return [
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": t.endpoint},
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": t.protocol},
        {"name": "OTEL_SERVICE_NAME", "value": f"{isvc.name}-{role}"},
        {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": repr(t.sampling_ratio)},
        {"name": "OTEL_RESOURCE_ATTRIBUTES",
         "value": f"k8s.namespace.name={isvc.namespace},splitserve.inferenceservice={isvc.name}"},
    ]  # fmt: skip


def scheduling(pool: PoolSpec, spread_labels: dict[str, str]) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity, topology spread, priority and runtime class.

    By default a role's pods prefer distinct nodes; given topologySpreadConstraints replace
    that preference. A pool asking for GPUs tolerates the GPU taint GPU node pools carry
    (``nvidia.com/gpu:NoSchedule`` on GKE, EKS and AKS) unless it lists tolerations itself.
    """
    o = pool.overrides
    out: dict[str, Any] = {}
    if pool.affinity:
        out["affinity"] = dict(pool.affinity)
    elif not o.topology_spread_constraints:
        out["affinity"] = {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": dict(spread_labels)},
                        },
                    }
                ]
            }
        }
    if o.topology_spread_constraints:
        out["topologySpreadConstraints"] = spread_constraints(o, spread_labels)
    if pool.node_selector:
        out["nodeSelector"] = dict(pool.node_selector)
    tolerations = [dict(t) for t in pool.tolerations]
    gpu = gpu_count(pool.resources)
    if not tolerations and gpu is not None:
        tolerations = [{"key": gpu[0], "operator": "Exists", "effect": "NoSchedule"}]
    if tolerations:
        out["tolerations"] = tolerations
    if o.priority_class_name:
        out["priorityClassName"] = o.priority_class_name
    if o.runtime_class_name:
        out["runtimeClassName"] = o.runtime_class_name
    return out


def pod_metadata(
    pool: PoolSpec, labels: Mapping[str, str], annotations: Mapping[str, str]
) -> dict[str, Any]:
    """A pod template's metadata: the pool's extra labels and annotations, then ours (ours win;
    the spec check refuses theirs on our keys anyway)."""
    o = pool.overrides
    meta: dict[str, Any] = {"labels": dict(o.pod_labels) | dict(labels)}
    merged = dict(o.pod_annotations) | dict(annotations)
    if merged:
        meta["annotations"] = merged
    return meta


def prometheus_annotations(isvc: InferenceService, port: int) -> dict[str, str]:
    """Annotation-based scrape discovery (the ``prometheus.io/*`` convention of Prometheus'
    kubernetes_sd example config and most Helm-installed Prometheus servers)."""
    if not isvc.spec.observability.metrics.prometheus_annotations:
        return {}
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def with_pool_extras(
    pool: PoolSpec,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The main container and pod volumes with the pool's env, envFrom, volumes and mounts."""
    o = pool.overrides
    container = dict(container)
    container["env"] = merge_env(container.get("env", []), o.env)
    if o.env_from:
        container["envFrom"] = [dict(e) for e in o.env_from]
    container["volumeMounts"] = list(container.get("volumeMounts", [])) + [
        dict(m) for m in o.volume_mounts
    ]
    return container, list(volumes) + [dict(v) for v in o.volumes]


def image_fields(isvc: InferenceService) -> dict[str, Any]:
    return {"image": isvc.spec.image, "imagePullPolicy": isvc.spec.image_pull_policy}


def pull_secrets(isvc: InferenceService) -> dict[str, Any]:
    secrets = isvc.spec.image_pull_secrets
    return {"imagePullSecrets": [{"name": n} for n in secrets]} if secrets else {}


def deployment(
    isvc: InferenceService,
    meta: dict[str, Any],
    replicas: int,
    selector: dict[str, str],
    template: dict[str, Any],
) -> dict[str, Any]:
    """A Deployment rolling under the spec's limits (shared by every pool)."""
    rollout = isvc.spec.rollout
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(selector)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": rollout.max_surge,
                    "maxUnavailable": rollout.max_unavailable,
                },
            },
            "revisionHistoryLimit": 5,
            # Model loading can take a long while; only then is a rollout declared stuck.
            "progressDeadlineSeconds": 1800,
            "template": template,
        },
    }
