"""A pod's volumes as host folders under its state folder, and each container's bind mounts.

Supported: emptyDir (medium Memory: a tmpfs, sizeLimit its size), configMap, secret,
downwardAPI, projected (serviceAccountToken, configMap, secret, downwardAPI), hostPath,
persistentVolumeClaim bound to a hostPath/local PersistentVolume, and image (an OCI image loaded
into the node's store, cluster/ociimages.py, mounted read-only; nothing is pulled).
configMap, secret, downwardAPI and projected volumes are read-only, as kubelet mounts them, and
are re-rendered by `refresh()` (tokens before they expire). Disk emptyDir sizeLimit is not
enforced (kubelet would evict).

When the API server's ServiceAccount admission did not add the standard token volume, and the pod
does not opt out with automountServiceAccountToken: false, the agent adds kubelet's layout itself:
token, ca.crt and namespace at /var/run/secrets/kubernetes.io/serviceaccount.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.cluster import ociimages
from splitserve.cluster.nodeagent import downward, projection
from splitserve.cluster.nodeagent.envvars import expand, lookup_in
from splitserve.cluster.nodeagent.objects import ApiObjects, NotReady, TokenIssuer

log = logging.getLogger(__name__)

SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_VOLUME = "kube-api-access-nodeagent"
SA_TOKEN_EXPIRATION_S = 3607  # what ServiceAccount admission asks for


class VolumeError(Exception):
    """A volume the agent cannot provide (unsupported type, bad hostPath): the pod cannot start."""


class ImagePullError(NotReady):
    """An image volume's image is not on the node: the pod waits, its containers in
    ErrImagePull, as when a kubelet cannot pull (retried: it may be loaded meanwhile)."""


def default_token_volume() -> dict[str, Any]:
    """The projected volume ServiceAccount admission adds to every pod that automounts."""
    return {
        "name": SA_VOLUME,
        "projected": {
            "defaultMode": 0o644,
            "sources": [
                {
                    "serviceAccountToken": {
                        "expirationSeconds": SA_TOKEN_EXPIRATION_S,
                        "path": "token",
                    }
                },
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            },
                        ]
                    }
                },
            ],
        },
    }


def with_default_token_volume(pod: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The pod's volumes, plus the standard token volume when admission did not add one."""
    spec = pod["spec"]
    volumes = list(spec.get("volumes") or [])
    if spec.get("automountServiceAccountToken") is False:
        return volumes, False
    containers = (spec.get("initContainers") or []) + spec["containers"]
    mounted = any(
        m.get("mountPath", "").rstrip("/") == SA_MOUNT_PATH
        for c in containers
        for m in c.get("volumeMounts") or []
    )
    if mounted:
        return volumes, False
    return volumes + [default_token_volume()], True


@dataclass
class HostVolume:
    """One volume on the host: where it is and whether the source forces read-only."""

    name: str
    path: Path
    readonly: bool
    kind: str
    source: dict[str, Any] = field(default_factory=dict)
    tmpfs: bool = False


@dataclass(frozen=True)
class PodContext:
    """Facts downward API items may reference."""

    host_ip: str
    pod_ip: str
    node_allocatable: dict[str, str]


class PodVolumes:
    """Sets up, refreshes and tears down one pod's volumes under `<pod dir>/volumes`."""

    def __init__(
        self,
        pod: dict[str, Any],
        pod_dir: Path,
        objects: ApiObjects,
        tokens: TokenIssuer,
        ctx: PodContext,
        images: ociimages.Store | None = None,
    ) -> None:
        self.pod = pod
        self.images = images or ociimages.Store()
        self.dir = pod_dir / "volumes"
        self.objects = objects
        self.tokens = tokens
        self.ctx = ctx
        self.namespace = pod["metadata"]["namespace"]
        self.fs_group: int | None = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        self.volumes: dict[str, HostVolume] = {}
        specs, self.default_token = with_default_token_volume(pod)
        self._specs = {v["name"]: v for v in specs}

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Make every volume; raises NotReady (retry later) or VolumeError (give up)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, spec in self._specs.items():
            if name not in self.volumes:
                self.volumes[name] = self._make(name, spec)
        self.refresh()

    def _make(self, name: str, spec: dict[str, Any]) -> HostVolume:
        path = self.dir / name
        if "emptyDir" in spec:
            return self._empty_dir(name, path, spec["emptyDir"] or {})
        if "hostPath" in spec:
            return HostVolume(name, _host_path(spec["hostPath"]), False, "hostPath")
        if "persistentVolumeClaim" in spec:
            claim = spec["persistentVolumeClaim"]
            try:
                host = self.objects.claim_host_path(self.namespace, claim["claimName"])
            except ValueError as exc:
                raise VolumeError(str(exc)) from exc
            if not Path(host).exists():
                raise NotReady(f"hostPath {host} of claim {claim['claimName']!r} does not exist")
            return HostVolume(
                name, Path(host), bool(claim.get("readOnly")), "persistentVolumeClaim"
            )
        if "image" in spec:
            reference = (spec["image"] or {}).get("reference", "")
            try:
                return HostVolume(name, self.images.rootfs(reference), True, "image")
            except ociimages.ImageUnavailable as exc:
                raise ImagePullError(f"volume {name!r}: {exc}") from exc
        for kind in ("configMap", "secret", "downwardAPI", "projected"):
            if kind in spec:
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o755)
                return HostVolume(name, path, True, kind, spec[kind] or {})
        kinds = sorted(k for k in spec if k != "name")
        raise VolumeError(f"volume {name!r}: unsupported volume type {kinds}")

    def _empty_dir(self, name: str, path: Path, source: dict[str, Any]) -> HostVolume:
        path.mkdir(parents=True, exist_ok=True)
        memory = source.get("medium") == "Memory"
        if memory and not _is_mountpoint(path):
            options = "mode=1777"
            if source.get("sizeLimit"):
                options += f",size={int(downward.quantity(source['sizeLimit']))}"
            _run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
        if self.fs_group is not None:
            shutil.chown(path, group=self.fs_group)
            path.chmod(0o2777)
        else:
            path.chmod(0o1777 if memory else 0o777)
        return HostVolume(name, path, False, "emptyDir", source, tmpfs=memory)

    # -- projections -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-render configMap/secret/downwardAPI/projected volumes (and renew tokens)."""
        owner = projection.Ownership(self.fs_group)
        for vol in self.volumes.values():
            if vol.kind in ("configMap", "secret", "downwardAPI", "projected"):
                payload = self._payload(vol)
                if projection.write_atomic(vol.path, payload, owner):
                    log.debug("volume %s/%s updated", self.pod["metadata"]["name"], vol.name)

    def _payload(self, vol: HostVolume) -> projection.Payload:
        src = vol.source
        mode = int(src.get("defaultMode", projection.DEFAULT_MODE))
        try:
            if vol.kind == "configMap":
                obj = self.objects.config_map(self.namespace, src["name"])
                return projection.config_map_payload(obj, src, mode)
            if vol.kind == "secret":
                obj = self.objects.secret(self.namespace, src["secretName"])
                return projection.secret_payload(obj, src, mode)
            if vol.kind == "downwardAPI":
                return self._downward(src.get("items") or [], mode)
            payload: projection.Payload = {}
            for source in src.get("sources") or []:
                payload |= self._projected_source(source, mode)
            return payload
        except projection.MissingSource as exc:
            raise NotReady(str(exc)) from exc

    def _downward(self, items: list[dict[str, Any]], mode: int) -> projection.Payload:
        return projection.downward_payload(
            self.pod,
            items,
            mode,
            host_ip=self.ctx.host_ip,
            pod_ip=self.ctx.pod_ip,
            node_allocatable=self.ctx.node_allocatable,
        )

    def _projected_source(self, source: dict[str, Any], mode: int) -> projection.Payload:
        if "serviceAccountToken" in source:
            s = source["serviceAccountToken"]
            token = self.tokens.token(
                self.pod, s.get("audience"), int(s.get("expirationSeconds", 3600))
            )
            return {s["path"]: (token.token.encode(), mode)}
        if "configMap" in source:
            s = source["configMap"]
            return projection.config_map_payload(
                self.objects.config_map(self.namespace, s["name"]), s, mode
            )
        if "secret" in source:
            s = source["secret"]
            return projection.secret_payload(
                self.objects.secret(self.namespace, s["name"]), s, mode
            )
        if "downwardAPI" in source:
            return self._downward(source["downwardAPI"].get("items") or [], mode)
        raise VolumeError(f"unsupported projected source {sorted(source)}")

    # -- mounts ------------------------------------------------------------------------------
    def mounts(self, container: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
        """The container's bind mounts: host source, container target, read-only flag."""
        wanted = list(container.get("volumeMounts") or [])
        if self.default_token:
            wanted.append({"name": SA_VOLUME, "mountPath": SA_MOUNT_PATH, "readOnly": True})
        out = []
        for m in wanted:
            vol = self.volumes.get(m["name"])
            if vol is None:
                raise VolumeError(
                    f"container {container['name']!r} mounts unknown volume {m['name']!r}"
                )
            source = vol.path
            sub = m.get("subPath") or (
                expand(m["subPathExpr"], lookup_in(env)) if m.get("subPathExpr") else ""
            )
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise VolumeError(f"invalid subPath {sub!r}")
                source = vol.path / sub
                if not source.exists() and not source.is_symlink():
                    source.mkdir(parents=True, exist_ok=True)  # kubelet creates missing subPaths
            out.append(
                {
                    "source": str(source.resolve()),
                    "target": m["mountPath"],
                    "readonly": bool(m.get("readOnly")) or vol.readonly,
                }
            )
        return out

    # -- teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Unmount tmpfs volumes and remove the pod's volume folders (hostPath/PVC data stays)."""
        for vol in self.volumes.values():
            if vol.tmpfs and _is_mountpoint(vol.path):
                _run(["umount", "-l", str(vol.path)], check=False)
        self.tokens.forget(self.pod["metadata"]["uid"])
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.volumes.clear()


def _host_path(source: dict[str, Any]) -> Path:
    path = Path(source["path"])
    kind = source.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise VolumeError(f"hostPath {path} is not a directory")
    elif kind == "File" and not path.is_file():
        raise VolumeError(f"hostPath {path} is not a file")
    elif kind == "" and not path.exists():
        path.mkdir(parents=True, exist_ok=True)  # docker's behaviour for an untyped hostPath
    return path


def _is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _run(argv: list[str], check: bool = True) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise VolumeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


def mounted_under(root: Path) -> list[str]:
    """Mount points under `root` in the host namespace (leftover tmpfs volumes), deepest first."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def unmount(point: str) -> None:
    _run(["umount", "-l", point], check=False)
