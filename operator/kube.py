"""A small async Kubernetes client: server-side apply, list, get, delete.

Only the calls the reconciler makes, over aiohttp with the credentials kopf logged in with (so
the operator and its tests share one path to the API). Apply is server-side apply with our field
manager and ``force``: we own the fields we set, and drift on them (a hand scale, an edit) is
taken back on the next pass. An API server without the object answers 404 to an apply only in
emulators; then we create it, which keeps the step create-or-patch everywhere.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from splitserve.operator.labels import FIELD_MANAGER


@dataclass(frozen=True)
class KindInfo:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{quote(namespace)}/{self.plural}"
        return f"{path}/{quote(name)}" if name else path


_KIND_LIST = [
    KindInfo("v1", "ServiceAccount", "serviceaccounts"),
    KindInfo("v1", "ConfigMap", "configmaps"),
    KindInfo("v1", "Service", "services"),
    KindInfo("rbac.authorization.k8s.io/v1", "Role", "roles"),
    KindInfo("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    KindInfo("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    KindInfo("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    KindInfo("apps/v1", "Deployment", "deployments"),
]
# The kinds an InferenceService owns (listed for pruning and deletion), by kind name.
CHILD_KINDS: dict[str, KindInfo] = {info.kind: info for info in _KIND_LIST}
# Read for status only (the Deployments own them): why pods fail to start or keep crashing.
PODS = KindInfo("v1", "Pod", "pods")


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying as is: server trouble, throttling or a conflicting writer."""
        return self.status >= 500 or self.status in (408, 409, 429)


@dataclass(frozen=True)
class Credentials:
    """How to reach the API server (a subset of kopf.ConnectionInfo)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None


class KubeApi:
    """Async client bound to one API server; create and close it inside the event loop.

    ``login`` is asked again on a 401, since service-account tokens rotate.
    """

    def __init__(self, login: Callable[[], Credentials]) -> None:
        self._login = login
        credentials = login()
        self._server = credentials.server.rstrip("/")
        self._token = credentials.token
        headers = {"Accept": "application/json"}
        context: ssl.SSLContext | bool = False
        if self._server.startswith("https"):
            context = ssl.create_default_context(
                cafile=credentials.ca_path,
                cadata=credentials.ca_data.decode() if credentials.ca_data else None,
            )
            if credentials.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if credentials.certificate_path:
                context.load_cert_chain(credentials.certificate_path, credentials.private_key_path)
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=context),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        """The decoded answer, None on 404; raises ApiError on other errors."""
        url = self._server + path + (f"?{urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body)
        status, text, reason = await self._send(method, url, data, content_type)
        if status == 401:
            self._token = self._login().token
            status, text, reason = await self._send(method, url, data, content_type)
        if status == 404:
            return None
        if status >= 400:
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {}
            raise ApiError(
                status,
                str(answer.get("reason") or reason),
                str(answer.get("message") or text[:500]),
            )
        return json.loads(text) if text else {}

    async def _send(
        self, method: str, url: str, data: str | None, content_type: str
    ) -> tuple[int, str, str]:
        headers = {"Content-Type": content_type} if data is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        async with self._session.request(method, url, data=data, headers=headers) as response:
            return response.status, await response.text(), str(response.reason)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply (create or update); returns the object as stored."""
        info = CHILD_KINDS[obj["kind"]]
        meta = obj["metadata"]
        path = info.path(meta["namespace"], meta["name"])
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        result = await self._request(
            "PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml"
        )
        if result is None:  # emulators only: a real server creates on apply
            result = await self._request(
                "POST",
                info.path(meta["namespace"]),
                query={"fieldManager": FIELD_MANAGER},
                body=obj,
            )
        if result is None:
            raise ApiError(404, "NotFound", f"{info.plural} is not served")
        return result

    async def list(
        self, info: KindInfo, namespace: str, selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects of a kind in a namespace (an unknown kind lists as empty)."""
        query = {"labelSelector": selector} if selector else None
        result = await self._request("GET", info.path(namespace), query=query)
        items = (result or {}).get("items") or []
        for item in items:  # list items omit their kind; builders and pruning need it
            item.setdefault("kind", info.kind)
            item.setdefault("apiVersion", info.api_version)
        return items

    async def get(self, info: KindInfo, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._request("GET", info.path(namespace, name))

    async def annotate(
        self, info: KindInfo, namespace: str, name: str, annotations: dict[str, str]
    ) -> bool:
        """Merge ``annotations`` into an object's (a JSON merge patch: nothing else is touched,
        no field ownership is taken); False if the object is gone."""
        body = {"metadata": {"annotations": annotations}}
        path = info.path(namespace, name)
        return (
            await self._request(
                "PATCH", path, body=body, content_type="application/merge-patch+json"
            )
            is not None
        )

    async def create(self, info: KindInfo, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        """POST a new object; 409 (already exists) raises ApiError."""
        result = await self._request("POST", info.path(namespace), body=obj)
        if result is None:
            raise ApiError(404, "NotFound", f"{info.plural} is not served")
        return result

    async def patch_unchanged(
        self, info: KindInfo, namespace: str, name: str, resource_version: str, spec: dict
    ) -> dict[str, Any]:
        """Merge-patch ``spec`` only if the object is still at ``resource_version`` (the API
        server answers 409 Conflict when someone wrote it since)."""
        body = {"metadata": {"resourceVersion": resource_version}, "spec": spec}
        result = await self._request(
            "PATCH",
            info.path(namespace, name),
            body=body,
            content_type="application/merge-patch+json",
        )
        if result is None:
            raise ApiError(404, "NotFound", f"{info.kind} {name} is gone")
        return result

    async def delete(self, info: KindInfo, namespace: str, name: str) -> bool:
        """Delete in the background (pods go with their Deployment); False if already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        return await self._request("DELETE", info.path(namespace, name), body=body) is not None
