"""Payloads of configMap, secret, downwardAPI and projected volumes; kubelet's atomic writer.

A payload maps relative paths to (bytes, mode). The writer puts a payload in a timestamped folder
and swaps the `..data` symlink to it, so a process reading the volume never sees a half-written
update; each top-level name is a symlink into `..data` (the layout kubelet's AtomicWriter makes).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.cluster.nodeagent import downward

DEFAULT_MODE = 0o644
DATA_LINK = "..data"

Payload = dict[str, tuple[bytes, int]]


class MissingSource(Exception):
    """A referenced ConfigMap/Secret/key does not exist (and is not optional)."""


def _items(
    data: dict[str, bytes], items: list[dict[str, Any]] | None, mode: int, what: str
) -> Payload:
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    out: Payload = {}
    for item in items:
        if item["key"] not in data:
            raise MissingSource(f"configmap/secret {what} has no key {item['key']!r}")
        out[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
    return out


def config_map_payload(
    obj: dict[str, Any] | None, source: dict[str, Any], default_mode: int
) -> Payload:
    """configMap volume (or projected source) content; `obj` None when it does not exist."""
    if obj is None:
        if source.get("optional"):
            return {}
        raise MissingSource(f'configmap "{source["name"]}" not found')
    data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
    data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    return _items(data, source.get("items"), default_mode, source["name"])


def secret_payload(
    obj: dict[str, Any] | None, source: dict[str, Any], default_mode: int
) -> Payload:
    """secret volume (or projected source) content; the volume's field is `secretName`."""
    name = source.get("secretName") or source.get("name")
    if obj is None:
        if source.get("optional"):
            return {}
        raise MissingSource(f'secret "{name}" not found')
    data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    return _items(data, source.get("items"), default_mode, str(name))


def downward_payload(
    pod: dict[str, Any],
    items: list[dict[str, Any]],
    default_mode: int,
    *,
    host_ip: str,
    pod_ip: str,
    node_allocatable: dict[str, str],
) -> Payload:
    """downwardAPI volume (or projected source) content."""
    out: Payload = {}
    for item in items:
        if "fieldRef" in item:
            path = item["fieldRef"]["fieldPath"]
            value = downward.pod_field(pod, path, host_ip=host_ip, pod_ip=pod_ip)
        else:
            ref = item["resourceFieldRef"]
            containers = (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
            container = next(c for c in containers if c["name"] == ref["containerName"])
            value = downward.container_resource(
                container, ref["resource"], ref.get("divisor"), node_allocatable
            )
        out[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
    return out


@dataclass(frozen=True)
class Ownership:
    """Who volume files belong to: root, with fsGroup's group when the pod sets one."""

    gid: int | None = None

    def apply(self, path: Path, mode: int) -> None:
        if self.gid is not None:
            os.chown(path, 0, self.gid)
            mode |= 0o040  # fsGroup members may read
        os.chmod(path, mode)


def _current(target: Path) -> Payload | None:
    data_dir = target / DATA_LINK
    if not data_dir.is_symlink():
        return None
    out: Payload = {}
    root = data_dir.resolve()
    for path in root.rglob("*"):
        if path.is_file():
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return out


def write_atomic(target: Path, payload: Payload, owner: Ownership = Ownership()) -> bool:
    """Make `target` hold exactly `payload`; False when it already did (nothing written)."""
    target.mkdir(parents=True, exist_ok=True)
    current = _current(target)
    if current is not None and {k: v[0] for k, v in current.items()} == {
        k: v[0] for k, v in payload.items()
    }:
        return False
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(time.time_ns() % 10**9)
    fresh = target / stamp
    fresh.mkdir(mode=0o755)
    for rel, (content, mode) in payload.items():
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"invalid path in volume payload: {rel!r}")
        path = fresh / rel
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(content)
        owner.apply(path, mode)
    old = (target / DATA_LINK).resolve() if (target / DATA_LINK).is_symlink() else None
    tmp_link = target / "..data_tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, target / DATA_LINK)
    tops = {rel.split("/")[0] for rel in payload}
    for top in tops:
        link = target / top
        if not link.is_symlink():
            link.symlink_to(f"{DATA_LINK}/{top}")
    for entry in target.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in tops:
            entry.unlink()
    if old is not None and old != fresh.resolve():
        shutil.rmtree(old, ignore_errors=True)
    return True
