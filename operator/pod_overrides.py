"""What a platform team passes through to one role's pods, typed, and where it may not go.

Each pool (prefill, decode, router) may add environment, volumes and mounts, scheduling fields
(priority class, runtime class, topology spread), pod annotations and labels, annotations on its
ServiceAccount, and for engines the size of the shared-memory volume. The CRD schema checks the
shape; `override_errors` checks what a schema cannot: that nothing replaces a volume, mount path,
label or annotation the operator itself relies on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitserve.operator.crd import FieldError

DEFAULT_SHM_SIZE = "1Gi"
# GPU resources that mean "this pool runs on accelerators" (engines then get --device cuda and
# the matching NoSchedule toleration that GPU node pools carry).
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


@dataclass(frozen=True)
class PodOverrides:
    """Pass-through fields of one role's pod template (all optional)."""

    env: tuple[Mapping[str, Any], ...] = ()
    env_from: tuple[Mapping[str, Any], ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str = ""
    runtime_class_name: str = ""
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    service_account_annotations: Mapping[str, str] = field(default_factory=dict)
    shm_size: str = DEFAULT_SHM_SIZE  # engines only: the memory-backed /dev/shm


def parse_overrides(pool: Mapping[str, Any]) -> PodOverrides:
    """The pass-through fields of one (schema-valid, defaulted) pool dict."""
    shm = pool.get("shmSize", DEFAULT_SHM_SIZE)
    return PodOverrides(
        env=tuple(dict(e) for e in pool.get("env") or ()),
        env_from=tuple(dict(e) for e in pool.get("envFrom") or ()),
        volumes=tuple(dict(v) for v in pool.get("volumes") or ()),
        volume_mounts=tuple(dict(m) for m in pool.get("volumeMounts") or ()),
        priority_class_name=pool.get("priorityClassName", ""),
        runtime_class_name=pool.get("runtimeClassName", ""),
        topology_spread_constraints=tuple(
            dict(t) for t in pool.get("topologySpreadConstraints") or ()
        ),
        pod_annotations=dict(pool.get("podAnnotations") or {}),
        pod_labels=dict(pool.get("podLabels") or {}),
        service_account_annotations=dict((pool.get("serviceAccount") or {}).get("annotations", {})),
        shm_size=str(shm),
    )


# What the operator's templates use (a test checks every built pod against these): overrides
# may not reuse a volume name or mount over one of these paths.
RESERVED_VOLUMES = frozenset(
    {"tmp", "cache", "shm", "engine-config", "model", "model-cache", "api-keys", "adapters"}
)
RESERVED_VOLUME_PREFIXES = ("adapters-",)  # one per claim LoRA adapters live on
RESERVED_MOUNT_PATHS = frozenset(
    {
        "/tmp", "/home/splitserve/.cache", "/dev/shm", "/etc/splitserve/engine",
        "/etc/splitserve/api-keys", "/models/cache", "/models/image", "/etc/splitserve/adapters",
    }
)  # fmt: skip
RESERVED_MOUNT_PREFIXES = ("/adapters/",)  # pvc:// LoRA adapters, /adapters/<claim>
RESERVED_LABEL_PREFIXES = ("serving.splitserve.io/", "app.kubernetes.io/")
RESERVED_ANNOTATION_PREFIXES = ("serving.splitserve.io/",)


@dataclass(frozen=True)
class Reserved:
    """What the operator's own pod template of a role uses, which overrides may not replace."""

    volumes: frozenset[str] = RESERVED_VOLUMES
    mount_paths: frozenset[str] = RESERVED_MOUNT_PATHS
    label_prefixes: tuple[str, ...] = RESERVED_LABEL_PREFIXES
    annotation_prefixes: tuple[str, ...] = RESERVED_ANNOTATION_PREFIXES


def override_errors(role: str, o: PodOverrides, reserved: Reserved) -> list[FieldError]:
    """Conflicts between one role's overrides and the operator's own template."""
    base = f"spec.{role}"
    errors: list[FieldError] = []
    names = [v["name"] for v in o.volumes]
    for i, name in enumerate(names):
        if name in reserved.volumes or name.startswith(RESERVED_VOLUME_PREFIXES):
            errors.append(FieldError(f"{base}.volumes[{i}].name", f"{name!r} is the operator's"))
        elif names.index(name) != i:
            errors.append(FieldError(f"{base}.volumes[{i}].name", f"{name!r} is repeated"))
    known = set(names)
    for i, mount in enumerate(o.volume_mounts):
        path = str(mount["mountPath"]).rstrip("/") or "/"
        if mount["name"] not in known:
            errors.append(
                FieldError(
                    f"{base}.volumeMounts[{i}].name",
                    f"{mount['name']!r} names no volume of spec.{role}.volumes",
                )
            )
        if path in reserved.mount_paths or (path + "/").startswith(RESERVED_MOUNT_PREFIXES):
            errors.append(
                FieldError(f"{base}.volumeMounts[{i}].mountPath", f"{path} is the operator's")
            )
    for key in o.pod_labels:
        if key.startswith(reserved.label_prefixes):
            errors.append(FieldError(f"{base}.podLabels.{key}", "is set by the operator"))
    for key in o.pod_annotations:
        if key.startswith(reserved.annotation_prefixes):
            errors.append(FieldError(f"{base}.podAnnotations.{key}", "is set by the operator"))
    return errors


def merge_env(ours: list[dict[str, Any]], theirs: tuple[Mapping[str, Any], ...]) -> list[dict]:
    """Our variables, then theirs; a name of ours they repeat takes their value in our place.

    Server-side apply keys env by name, so a repeated name would be refused: the user's entry
    replaces ours (e.g. SPLITSERVE_THREADS, HF_HOME) rather than adding a second one.
    """
    by_name = {e["name"]: dict(e) for e in theirs}
    merged = [by_name.pop(e["name"], e) for e in ours]
    return merged + [dict(e) for e in theirs if e["name"] in by_name]


def spread_constraints(o: PodOverrides, role_selector: Mapping[str, str]) -> list[dict[str, Any]]:
    """topologySpreadConstraints, each without a labelSelector given the role's pods."""
    out = []
    for c in o.topology_spread_constraints:
        c = dict(c)
        c.setdefault("labelSelector", {"matchLabels": dict(role_selector)})
        out.append(c)
    return out


def gpu_count(resources: Mapping[str, Any]) -> tuple[str, str] | None:
    """(resource name, count) of the first GPU resource a pool requests or limits, else None."""
    for kind in ("limits", "requests"):
        for name in GPU_RESOURCES:
            value = (resources.get(kind) or {}).get(name)
            if value not in (None, 0, "0"):
                return name, str(value)
    return None
