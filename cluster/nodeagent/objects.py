"""The objects a pod references, read one by one as the Node authorizer allows.

The authorizer learns a pod's references (its Secrets, ConfigMaps, PVCs and their PVs, its service
account) from a graph it updates when the pod is bound; just after binding a read may be refused
(403) for a moment, so 403 counts as "not ready yet" and the caller retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from splitserve.cluster.nodeagent.kube import Kube, describe, is_status


class NotReady(Exception):
    """A referenced object cannot be read yet, or is not in the state needed (retry later)."""


class ApiObjects:
    """Reads for one pod's namespace; `None` means the object does not exist."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.kube.get(path)
        except Exception as exc:
            if is_status(exc, 403):
                raise NotReady(f"not yet allowed to read {path}: {describe(exc)}") from exc
            raise

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def claim_host_path(self, namespace: str, claim: str) -> str:
        """The host folder behind a PVC bound to a hostPath (or local) PersistentVolume."""
        pvc = self._get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        if pvc is None:
            raise NotReady(f'persistentvolumeclaim "{claim}" not found')
        volume = (pvc.get("spec") or {}).get("volumeName")
        if (pvc.get("status") or {}).get("phase") != "Bound" or not volume:
            raise NotReady(f'persistentvolumeclaim "{claim}" is not bound')
        pv = self._get(f"/api/v1/persistentvolumes/{volume}")
        if pv is None:
            raise NotReady(f'persistentvolume "{volume}" not found')
        spec = pv.get("spec") or {}
        source = spec.get("hostPath") or spec.get("local")
        if not source:
            kinds = sorted(k for k in spec if isinstance(spec[k], dict))
            raise ValueError(f"persistentvolume {volume!r} is not hostPath/local ({kinds})")
        return str(source["path"])

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"/api/v1/namespaces/{namespace}/services/{name}")

    def services(self, namespace: str) -> list[dict[str, Any]]:
        items = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/services")["items"]
        return list(items)


@dataclass(frozen=True)
class Token:
    token: str
    issued_at: float
    expires_at: float

    def needs_refresh(self, now: float) -> bool:
        """kubelet's rule: past 80% of its lifetime, or older than 24 hours."""
        ttl = self.expires_at - self.issued_at
        return now > self.issued_at + 0.8 * ttl or now > self.issued_at + 24 * 3600


class TokenIssuer:
    """Service-account tokens bound to a pod (TokenRequest), cached until they need a refresh."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._cache: dict[tuple[str, str, str, str, int], Token] = {}

    def token(
        self, pod: dict[str, Any], audience: str | None, expiration_s: int, now: float | None = None
    ) -> Token:
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        key = (meta["namespace"], meta["uid"], account, audience or "", expiration_s)
        now = time.time() if now is None else now
        cached = self._cache.get(key)
        if cached is not None and not cached.needs_refresh(now):
            return cached
        spec: dict[str, Any] = {
            "expirationSeconds": expiration_s,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            reply = self.kube.request("POST", path, body=body)
        except Exception as exc:
            if is_status(exc, 403, 404):
                raise NotReady(f"token for service account {account!r}: {describe(exc)}") from exc
            raise
        status = reply["status"]
        expires = _parse_time(status["expirationTimestamp"])
        token = Token(status["token"], now, expires)
        self._cache[key] = token
        return token

    def forget(self, uid: str) -> None:
        for key in [k for k in self._cache if k[1] == uid]:
            del self._cache[key]


def _parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
