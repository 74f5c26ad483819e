"""Prefill and decode Deployments: the engine command line, probes and volumes.

The command line is the contract with `splitserve prefill|decode` (see docs/operator.md). Both
roles are built by one function so that their engine flags can never disagree.
"""

from __future__ import annotations

from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.adapters import adapter_volumes, engine_lora_args
from splitserve.operator.builders import drain, pod
from splitserve.operator.builders.config import (
    ENGINE_CONFIG_MOUNT,
    config_checksum,
    config_map_name,
)
from splitserve.operator.builders.model import model_mounts
from splitserve.operator.pod_overrides import gpu_count
from splitserve.operator.spec import InferenceService, PoolSpec
from splitserve.protocol.constants import ENGINE_GRPC_PORT, ENGINE_METRICS_PORT

GRPC_PORT = ENGINE_GRPC_PORT
METRICS_PORT = ENGINE_METRICS_PORT
ENGINE_SERVICE_ACCOUNT_SUFFIX = "engine"


def engine_pool(isvc: InferenceService, role: str) -> PoolSpec:
    return isvc.spec.prefill if role == L.PREFILL else isvc.spec.decode


def engine_args(isvc: InferenceService, role: str) -> list[str]:
    """`splitserve prefill|decode ...` arguments (the image's entrypoint is `splitserve`)."""
    s = isvc.spec
    args = [role]
    if role == L.DECODE and s.colocated:
        args.append("--colocated")
    args += ["--model", s.model.engine_argument]
    if s.model.revision:
        args += ["--revision", s.model.revision]
    args += [
        "--served-name", s.model.served_name,
        "--dtype", s.engine.dtype,
        "--block-size", str(s.engine.block_size),
        "--max-model-len", str(s.engine.max_model_len),
        "--host", "0.0.0.0",
        "--port", str(GRPC_PORT),
        "--metrics-port", str(METRICS_PORT),
        "--kv-transport", s.kv_transfer.transport,
        "--log-format", s.observability.log_format,
        "--drain-seconds", str(s.drain_seconds),
    ]  # fmt: skip
    if s.engine.max_num_seqs is not None:
        args += ["--max-num-seqs", str(s.engine.max_num_seqs)]
    if s.engine.performance_mode is not None:
        args += ["--performance-mode", s.engine.performance_mode]
    if s.engine.quantization is not None:  # "none" too: it overrides a mode's scheme
        args += ["--quantization", s.engine.quantization]
    # Leases are the prefill side's (how long handed-off blocks are kept); the failure policy
    # is the decode side's (what to do when a pull fails). Each server refuses the other's flag.
    if role == L.PREFILL:
        args += ["--lease-seconds", str(s.kv_transfer.lease_seconds)]
    else:
        args += ["--kv-failure-policy", s.kv_transfer.failure_policy]
    # A pool that asks for GPUs runs its engine on them (--device in extraArgs still wins).
    gpu = gpu_count(engine_pool(isvc, role).resources)
    if gpu is not None and not any(a.split("=", 1)[0] == "--device" for a in s.engine.extra_args):
        args += ["--device", "cuda"]
    return args + engine_lora_args(isvc) + list(s.engine.extra_args)


def _threads_env() -> dict[str, Any]:
    """torch's CPU threads = the pod's CPU request, rounded up (torch would take every core of
    the node, whatever the pod asked for; ``--threads`` in extraArgs still wins)."""
    return {
        "name": "SPLITSERVE_THREADS",
        "valueFrom": {"resourceFieldRef": {"containerName": "engine", "resource": "requests.cpu"}},
    }


def _grpc_probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "grpc": {"port": GRPC_PORT},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def build_engine_deployment(isvc: InferenceService, role: str) -> dict[str, Any]:
    """The Deployment of one engine role (`prefill`, or `decode` which may be colocated) for
    the spec's generation: named and selected by its rollout hash. A new generation is a new
    Deployment beside the old one, which the reconciler keeps until the new one serves
    (pairs never cross generations, so both roles of the old one must stay until then)."""
    pool = engine_pool(isvc, role)
    labels = L.engine_labels(isvc, role)
    model = model_mounts(isvc)
    lora_volumes, lora_mounts = adapter_volumes(isvc)
    container = {
        "name": "engine",
        **pod.image_fields(isvc),
        "args": engine_args(isvc, role),
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": pod.base_env() + [_threads_env()] + pod.observability_env(isvc, role),
        "resources": {k: dict(v) for k, v in pool.resources.items()},
        # Model loading may take minutes: the startup probe holds liveness off until then
        # (30 min); probed often, so a pod is taken into service soon after it can serve.
        "startupProbe": _grpc_probe(period=2, failures=900),
        "readinessProbe": _grpc_probe(period=5, failures=2),
        "livenessProbe": _grpc_probe(period=10, failures=3),
        **drain.lifecycle(isvc),
        "securityContext": pod.container_security_context(),
        # A crash's last output lines become the container's termination message, which the
        # operator reports in the Degraded condition (kubectl describe shows it too).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": pod.scratch_mounts()
        + [
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "engine-config", "mountPath": ENGINE_CONFIG_MOUNT, "readOnly": True},
        ]
        + model.mounts
        + lora_mounts,
    }
    volumes = (
        pod.scratch_volumes()
        + [
            # Shared memory for the KV transport (UCX) and NCCL between processes on a node.
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": pool.overrides.shm_size}},
            {"name": "engine-config", "configMap": {"name": config_map_name(isvc)}},
        ]
        + model.volumes
        + lora_volumes
    )
    container, volumes = pod.with_pool_extras(pool, container, volumes)
    annotations = {L.CONFIG_CHECKSUM_ANNOTATION: config_checksum(isvc)}
    annotations |= pod.prometheus_annotations(isvc, METRICS_PORT)
    spec: dict[str, Any] = {
        "serviceAccountName": L.child_name(isvc, ENGINE_SERVICE_ACCOUNT_SUFFIX),
        "automountServiceAccountToken": False,
        "securityContext": pod.pod_security_context(),
        "terminationGracePeriodSeconds": drain.termination_grace_seconds(isvc),
        **pod.pull_secrets(isvc),
        **pod.scheduling(pool, L.selector_labels(isvc, role)),
    }
    if model.init_containers:
        spec["initContainers"] = model.init_containers
    spec |= {"containers": [container], "volumes": volumes}
    template = {"metadata": pod.pod_metadata(pool, labels, annotations), "spec": spec}
    meta = L.metadata(isvc, L.engine_deployment_name(isvc, role), labels)
    return pod.deployment(isvc, meta, pool.replicas, L.generation_selector(isvc, role), template)


def build_engine_service_account(isvc: InferenceService) -> dict[str, Any]:
    """Engines never call the Kubernetes API: their account mounts no token. Both roles share
    it, with both pools' annotations (the spec check refuses two values for one key)."""
    s = isvc.spec
    annotations = dict(s.decode.overrides.service_account_annotations)
    if not s.colocated:
        annotations = dict(s.prefill.overrides.service_account_annotations) | annotations
    name = L.child_name(isvc, ENGINE_SERVICE_ACCOUNT_SUFFIX)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": L.metadata(isvc, name, L.ownership_labels(isvc), annotations or None),
        "automountServiceAccountToken": False,
    }
