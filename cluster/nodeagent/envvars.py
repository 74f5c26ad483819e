"""A container's environment, built as kubelet builds it.

Order and precedence follow kubelet's makeEnvironmentVariables: envFrom sources in order (later
ones win), then `env` in order, each value `$(VAR)`-expanded against what is defined so far and the
service variables; service variables fill in only names not set by the pod. The image's ENV and
HOSTNAME go underneath all of that (the runtime's layer), see `process_env`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from splitserve.cluster.nodeagent import downward

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class ConfigError(Exception):
    """The pod's configuration cannot be resolved yet (kubelet: CreateContainerConfigError)."""


class Objects(Protocol):
    """Reads the ConfigMaps and Secrets a pod references; None when one does not exist."""

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes `$(VAR)` expansion: unknown names stay as written, `$$` escapes a `$`."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # incomplete reference: kept verbatim
                out.append("$(")
                i += 2
                continue
            name = text[i + 2 : close]
            value = lookup(name)
            out.append(value if value is not None else f"$({name})")
            i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def lookup_in(*maps: Mapping[str, str]) -> Callable[[str], str | None]:
    """A `$(VAR)` lookup over several maps, the first holding a name wins."""

    def lookup(name: str) -> str | None:
        for m in maps:
            if name in m:
                return m[name]
        return None

    return lookup


@dataclass(frozen=True)
class ServiceAddress:
    """One Service as env vars see it: name, ClusterIP, ports as (name, port, protocol)."""

    name: str
    cluster_ip: str
    ports: tuple[tuple[str, int, str], ...]


def service_variables(services: list[ServiceAddress]) -> dict[str, str]:
    """`<NAME>_SERVICE_HOST`, `_SERVICE_PORT[_<PORT>]` and Docker-link variables (kubelet's)."""
    env: dict[str, str] = {}
    for svc in services:
        if not svc.cluster_ip or svc.cluster_ip == "None" or not svc.ports:
            continue
        prefix = svc.name.upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = svc.cluster_ip
        env[f"{prefix}_SERVICE_PORT"] = str(svc.ports[0][1])
        for port_name, port, _ in svc.ports:
            if port_name:
                env[f"{prefix}_SERVICE_PORT_{port_name.upper().replace('-', '_')}"] = str(port)
        for i, (_, port, protocol) in enumerate(svc.ports):
            proto = (protocol or "TCP").lower()
            url = f"{proto}://{svc.cluster_ip}:{port}"
            if i == 0:
                env[f"{prefix}_PORT"] = url
            base = f"{prefix}_PORT_{port}_{proto.upper()}"
            env[base] = url
            env[f"{base}_PROTO"] = proto
            env[f"{base}_PORT"] = str(port)
            env[f"{base}_ADDR"] = svc.cluster_ip
    return env


def service_address(service: dict[str, Any]) -> ServiceAddress:
    """A Service object (API JSON) as a ServiceAddress."""
    spec = service.get("spec", {})
    ports = tuple(
        (p.get("name", ""), int(p["port"]), p.get("protocol", "TCP")) for p in spec.get("ports", [])
    )
    return ServiceAddress(service["metadata"]["name"], spec.get("clusterIP", ""), ports)


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {
        k: base64.b64decode(v).decode(errors="replace")
        for k, v in (secret.get("data") or {}).items()
    }


@dataclass(frozen=True)
class EnvContext:
    """Facts a container's env vars may reference besides the pod itself."""

    pod_ip: str
    host_ip: str
    node_allocatable: dict[str, str]
    service_env: dict[str, str]


def container_env(
    pod: dict[str, Any], container: dict[str, Any], ctx: EnvContext, objects: Objects
) -> dict[str, str]:
    """The env vars a pod spec gives one container (insertion order = kubelet's order)."""
    namespace = pod["metadata"].get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref, data = source["configMapRef"], None
            obj = objects.config_map(namespace, ref["name"])
            data = None if obj is None else dict(obj.get("data") or {})
            kind = "ConfigMap"
        else:
            ref = source["secretRef"]
            obj = objects.secret(namespace, ref["name"])
            data = None if obj is None else _decoded(obj)
            kind = "Secret"
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
        for key, value in data.items():
            if _ENV_NAME.match(prefix + key):  # invalid names are skipped, as kubelet does
                env[prefix + key] = value
    lookup = lookup_in(env, ctx.service_env)
    for var in container.get("env") or []:
        name, value = var["name"], var.get("value", "")
        if value:
            env[name] = expand(value, lookup)
            continue
        source = var.get("valueFrom")
        if not source:
            env[name] = ""
            continue
        resolved = _value_from(pod, container, source, ctx, objects, namespace)
        if resolved is not None:
            env[name] = resolved
    for key, value in ctx.service_env.items():
        env.setdefault(key, value)
    return env


def _value_from(
    pod: dict[str, Any],
    container: dict[str, Any],
    source: dict[str, Any],
    ctx: EnvContext,
    objects: Objects,
    namespace: str,
) -> str | None:
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        return downward.pod_field(pod, path, host_ip=ctx.host_ip, pod_ip=ctx.pod_ip)
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        target = container
        if ref.get("containerName"):
            everyone = (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
            target = next(c for c in everyone if c["name"] == ref["containerName"])
        return downward.container_resource(
            target, ref["resource"], ref.get("divisor"), ctx.node_allocatable
        )
    if "configMapKeyRef" in source or "secretKeyRef" in source:
        is_map = "configMapKeyRef" in source
        ref = source["configMapKeyRef" if is_map else "secretKeyRef"]
        kind = "ConfigMap" if is_map else "Secret"
        obj = (objects.config_map if is_map else objects.secret)(namespace, ref["name"])
        if obj is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{kind.lower()} "{ref["name"]}" not found')
        data = dict(obj.get("data") or {}) if is_map else _decoded(obj)
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
        return data[ref["key"]]
    raise ConfigError(f"unsupported valueFrom: {sorted(source)}")


def process_env(
    image_env: Mapping[str, str], hostname: str, pod_env: Mapping[str, str]
) -> dict[str, str]:
    """What the process really gets: the image's ENV, HOSTNAME, then the pod's variables."""
    return {**image_env, "HOSTNAME": hostname, **pod_env}
