"""LoRA adapters of an InferenceService: the adapter list every engine pod watches, its volumes
and flags, and the status of what each role has loaded.

Adding or removing an adapter must not restart pods, so the list lives in its own ConfigMap
(``<name>-adapters``), which is *not* part of the engine-config checksum on the pod template:
the kubelet refreshes the mounted file in place, and each engine (``--lora-modules-file``)
loads the adapters it gains and unloads those it loses. The ConfigMap is mounted whenever LoRA
is enabled, so the first adapter needs no restart either. A ``pvc://`` adapter on a claim that no
pod mounts yet is the exception: Kubernetes cannot add a volume to a running pod, so the pod
template changes and the pods roll once.

Status: the operator asks each ready engine pod which adapters it has loaded (``GetInfo`` on the
pod's gRPC port) and reports, per adapter, how many pods of each role have it, and per role the
adapters every ready pod has. The condition ``AdaptersLoaded`` is True once every spec adapter is
loaded on every ready engine pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from splitserve.operator import labels as L
from splitserve.operator.spec import InferenceService

log = logging.getLogger(__name__)

ADAPTERS_KEY = "adapters.json"
ADAPTERS_MOUNT = "/etc/splitserve/adapters"
ADAPTERS_FILE = f"{ADAPTERS_MOUNT}/{ADAPTERS_KEY}"
ADAPTERS_LOADED = "AdaptersLoaded"


def adapters_config_map_name(isvc: InferenceService) -> str:
    return L.child_name(isvc, "adapters")


def adapter_list(isvc: InferenceService) -> list[dict[str, str]]:
    """What the engines' ``--lora-modules-file`` holds: name and in-pod path of each adapter."""
    return [{"name": a.name, "path": a.engine_path} for a in isvc.spec.adapters]


def build_adapters_config_map(isvc: InferenceService) -> dict[str, Any]:
    """The watched adapter list (never part of a pod template checksum)."""
    text = json.dumps(adapter_list(isvc), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": L.metadata(isvc, adapters_config_map_name(isvc), L.ownership_labels(isvc)),
        "data": {ADAPTERS_KEY: text},
    }


def engine_lora_args(isvc: InferenceService) -> list[str]:
    """The engine flags for LoRA (none when it is off)."""
    if not isvc.spec.lora_enabled:
        return []
    lora = isvc.spec.engine.lora
    return [
        "--enable-lora", "--lora-modules-file", ADAPTERS_FILE,
        "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank),
    ]  # fmt: skip


def adapter_volumes(isvc: InferenceService) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the adapter list, and each claim ``pvc://`` adapters live on."""
    if not isvc.spec.lora_enabled:
        return [], []
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", "configMap": {"name": adapters_config_map_name(isvc)}}
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True}
    ]
    claims = sorted({a.pvc_claim for a in isvc.spec.adapters if a.pvc_claim})
    for i, claim in enumerate(claims):
        name = f"adapters-pvc-{i}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim,
                                                                "readOnly": True}})  # fmt: skip
        mounts.append({"name": name, "mountPath": f"/adapters/{claim}", "readOnly": True})
    return volumes, mounts


# ---- status ---------------------------------------------------------------------------------


class AdapterProbe(Protocol):
    """Asks one engine pod which adapters it has loaded (None: it could not be asked)."""

    async def loaded(self, address: str) -> list[str] | None: ...


class GrpcAdapterProbe:
    """``EngineService.GetInfo`` on the pod's gRPC port (the engines' NetworkPolicy admits the
    operator's pods there)."""

    def __init__(self, timeout_s: float = 3.0) -> None:
        self.timeout_s = timeout_s

    async def loaded(self, address: str) -> list[str] | None:
        import grpc

        from splitserve.proto import splitserve_pb2 as pb
        from splitserve.proto import splitserve_pb2_grpc as pb_grpc

        try:
            async with grpc.aio.insecure_channel(address) as channel:
                info = await pb_grpc.EngineServiceStub(channel).GetInfo(
                    pb.EngineInfoRequest(), timeout=self.timeout_s
                )
        except grpc.RpcError as err:
            log.info("engine pod %s did not say which adapters it has: %s", address, err.code())
            return None
        return [a.name for a in info.lora_adapters]


def _ready_engine_pods(
    pods: Sequence[Mapping[str, Any]], roles: Sequence[str]
) -> dict[str, list[str]]:
    """role -> the gRPC addresses of its ready pods."""
    from splitserve.operator.builders.engine import GRPC_PORT

    out: dict[str, list[str]] = {role: [] for role in roles}
    for p in pods:
        role = ((p.get("metadata") or {}).get("labels") or {}).get(L.ROLE_LABEL)
        status = p.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if role in out and ready and status.get("podIP"):
            out[role].append(f"{status['podIP']}:{_grpc_port(p, GRPC_PORT)}")
    return out


def _grpc_port(pod: Mapping[str, Any], default: int) -> int:
    """The engine container's port named ``grpc``."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "grpc":
                return int(port["containerPort"])
    return default


async def probe_loaded(
    probe: AdapterProbe, pods: Sequence[Mapping[str, Any]], roles: Sequence[str]
) -> dict[str, list[list[str] | None]]:
    """role -> each ready pod's loaded adapters (None where the pod could not be asked)."""
    addresses = _ready_engine_pods(pods, roles)
    out: dict[str, list[list[str] | None]] = {}
    for role, addrs in addresses.items():
        out[role] = list(await asyncio.gather(*(probe.loaded(a) for a in addrs)))
    return out


def adapters_status(
    isvc: InferenceService, loaded: Mapping[str, Sequence[list[str] | None]]
) -> tuple[dict[str, Any], tuple[bool, str, str]]:
    """The status fields (``adapters``, ``loadedAdapters``) from each ready pod's loaded
    adapters by role, and the ``AdaptersLoaded`` condition as (status, reason, message)."""
    names = [a.name for a in isvc.spec.adapters]
    per_role = {role: [set(x) for x in pods if x is not None] for role, pods in loaded.items()}
    rows = []
    missing: list[str] = []
    for name in names:
        row: dict[str, Any] = {"name": name}
        complete = True
        for role, pods in loaded.items():
            have = sum(name in p for p in per_role[role])
            row[role] = f"{have}/{len(pods)}"
            if have < len(pods) or not pods:
                complete = False
                missing.append(f"{name} ({role} {have}/{len(pods)})")
        row["loaded"] = complete
        rows.append(row)
    every = {
        role: sorted(set.intersection(*pods)) if pods and len(pods) == len(loaded[role]) else []
        for role, pods in per_role.items()
    }
    fields = {"adapters": rows, "loadedAdapters": every}
    if not names:
        return fields, (True, "NoAdapters", "no adapters in the spec")
    if missing:
        return fields, (
            False,
            "Loading",
            "not loaded yet on every ready pod: " + ", ".join(missing),
        )
    return fields, (True, "AllLoaded", f"{len(names)} adapter(s) on every ready engine pod")
