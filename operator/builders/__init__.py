"""Pure builders: typed InferenceService -> the desired child objects (plain dicts).

No I/O and no clock: the same spec always yields the same objects, which is what makes apply
idempotent and `splitserve operator render` trustworthy for GitOps review.
"""

from __future__ import annotations

from typing import Any

from splitserve.operator import labels as L
from splitserve.operator.adapters import build_adapters_config_map
from splitserve.operator.builders.config import build_config_map, config_checksum
from splitserve.operator.builders.engine import (
    build_engine_deployment,
    build_engine_service_account,
)
from splitserve.operator.builders.network import (
    build_engine_network_policy,
    build_headless_service,
    build_pdb,
)
from splitserve.operator.builders.router import (
    build_router_deployment,
    build_router_rbac,
    build_router_service,
    endpoint_url,
)
from splitserve.operator.spec import InferenceService

__all__ = ["build_desired", "config_checksum", "endpoint_url", "engine_roles"]


def engine_roles(isvc: InferenceService) -> tuple[str, ...]:
    """The engine roles that have pods: decode only when colocated."""
    return (L.DECODE,) if isvc.spec.colocated else L.ENGINE_ROLES


def build_desired(isvc: InferenceService) -> list[dict[str, Any]]:
    """Every child object, in apply order (accounts and config before the pods that use them)."""
    roles = engine_roles(isvc)
    objects: list[dict[str, Any]] = [build_engine_service_account(isvc)]
    objects += build_router_rbac(isvc)
    objects.append(build_config_map(isvc))
    if isvc.spec.lora_enabled:
        objects.append(build_adapters_config_map(isvc))
    objects += [build_headless_service(isvc, role) for role in roles]
    objects.append(build_router_service(isvc))
    objects.append(build_engine_network_policy(isvc))
    objects += [build_pdb(isvc, role) for role in (*roles, L.ROUTER)]
    # Decode before prefill: new prefill pods are useful only once compatible decode pods exist.
    objects += [build_engine_deployment(isvc, role) for role in reversed(roles)]
    objects.append(build_router_deployment(isvc))
    return objects
