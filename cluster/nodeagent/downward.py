"""The downward API: pod fields and container resources as strings, for env vars and volumes."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$"
)


def quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "4Gi", "1.5", "2e3") as an exact number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(f"not a resource quantity: {text!r}")
    number, exponent, suffix = match.groups()
    value = Decimal(number)
    if exponent:
        return value * Decimal(10) ** int(exponent[1:])
    return value * Decimal(_SUFFIXES[suffix or ""])


class FieldError(ValueError):
    """A downward API reference the agent cannot resolve."""


def _subscript(path: str, prefix: str) -> str | None:
    """`metadata.labels['key']` -> key."""
    match = re.fullmatch(re.escape(prefix) + r"\['(.*)'\]", path)
    return match.group(1) if match else None


def _format_map(values: dict[str, str]) -> str:
    # The volume form of labels/annotations: one `key="value"` per line, sorted.
    return "\n".join(f'{k}="{_escape(v)}"' for k, v in sorted(values.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def pod_field(pod: dict[str, Any], path: str, *, host_ip: str, pod_ip: str) -> str:
    """Resolve a fieldRef.fieldPath as kubelet does (labels/annotations maps: volumes only)."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
    }
    if path in simple:
        return simple[path]
    for field in ("labels", "annotations"):
        key = _subscript(path, f"metadata.{field}")
        if key is not None:
            return (meta.get(field) or {}).get(key, "")
        if path == f"metadata.{field}":
            return _format_map(meta.get(field) or {})
    raise FieldError(f"unsupported fieldPath {path!r}")


def container_resource(
    container: dict[str, Any], resource: str, divisor: str | None, node_allocatable: dict[str, str]
) -> str:
    """Resolve a resourceFieldRef: a limit falls back to the node's allocatable, as kubelet's."""
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise FieldError(f"unsupported resource {resource!r}")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(name)  # requests default to limits
    if value is None:
        value = node_allocatable.get(name, "0") if kind == "limits" else "0"
    amount, div = quantity(value), quantity(divisor or "1")
    if div == 0:
        # The API server stores an unset divisor as "0"; kubelet reads a zero divisor as 1.
        div = quantity("1")
    if div < 0:
        raise FieldError(f"divisor must be positive: {divisor!r}")
    # kubelet rounds up: 500m of CPU with divisor 1 is "1".
    return str(int(math.ceil(amount / div)))
