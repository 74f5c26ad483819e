"""Finding engine pods: a static list (local mode) or Kubernetes EndpointSlices (in cluster).

Kubernetes: the operator gives each engine role a headless Service; its EndpointSlices list the
pods' addresses and readiness. The router lists and watches the slices matching the role's label
selector, keeps ready endpoints and terminating ones (as *draining*: the pool sends them nothing
new and lets the streams already there finish), and reads each endpoint's Pod (via
``targetRef``) for its ``rollout-hash`` label so that prefill and decode pods are paired only
when their KV caches mean the same thing. When both selectors are equal, the pods are colocated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from splitserve.protocol.labels import GRPC_PORT_NAME, ROLLOUT_HASH_LABEL
from splitserve.services.router.pool import DECODE, PREFILL, Endpoint

log = logging.getLogger(__name__)

_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def parse_addresses(text: str | None) -> list[str]:
    """``host:port,host:port`` -> list (empty entries dropped, ports checked)."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {item!r} is not host:port")
        out.append(item)
    return out


def static_endpoints(
    prefill: Iterable[str], decode: Iterable[str], colocated: Iterable[str]
) -> list[Endpoint]:
    """Endpoints of local mode. An address in both lists is a colocated pod."""
    roles: dict[str, set[str]] = {}
    for addr in prefill:
        roles.setdefault(addr, set()).add(PREFILL)
    for addr in decode:
        roles.setdefault(addr, set()).add(DECODE)
    for addr in colocated:
        roles.setdefault(addr, set()).update((PREFILL, DECODE))
    return [Endpoint(addr, frozenset(r)) for addr, r in roles.items()]


# ---- Kubernetes: the pure part ------------------------------------------------------------------


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selector (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``), comma = AND.

    The API server filters by ``labelSelector`` already; matching again here keeps a lenient
    server (or an emulator) from leaking another service's pods into the pool.
    """
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _state(endpoint: Mapping[str, Any]) -> str | None:
    """``ready``, ``draining`` (terminating: being deleted, finishing its work) or None."""
    cond = endpoint.get("conditions") or {}
    if cond.get("terminating", False):
        return "draining"
    # `ready` unset means unknown, which consumers should treat as ready (API docs).
    return "ready" if cond.get("ready", True) is not False else None


def slice_endpoints(
    slices: Iterable[Mapping[str, Any]],
    pods: Mapping[str, Mapping[str, Any]],
    roles: frozenset[str],
    port_name: str = GRPC_PORT_NAME,
) -> list[Endpoint]:
    """Ready and terminating endpoints of ``slices`` as ``Endpoint`` s with ``roles``
    (terminating ones marked ``draining``).

    ``pods`` maps pod name -> Pod object (for the rollout-hash label). An endpoint whose
    pod is unknown is skipped: without its hash it can not be paired safely (it appears once
    read). Where a terminating endpoint and a live one share an address, the live one wins
    (``_newer``).
    """
    out: dict[str, Endpoint] = {}
    for s in slices:
        if s.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        port = next(
            (p.get("port") for p in s.get("ports") or [] if p.get("name") == port_name), None
        )
        if port is None:
            continue
        for ep in s.get("endpoints") or []:
            state = _state(ep)
            if state is None or not ep.get("addresses"):
                continue
            ref = ep.get("targetRef") or {}
            pod = pods.get(ref.get("name", "")) if ref.get("kind", "Pod") == "Pod" else None
            if pod is None:
                continue
            labels = (pod.get("metadata") or {}).get("labels") or {}
            host = ep["addresses"][0]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            endpoint = Endpoint(
                address,
                roles,
                labels.get(ROLLOUT_HASH_LABEL, ""),
                ref.get("name", ""),
                draining=state == "draining",
            )
            out[address] = _newer(out.get(address), endpoint)
    return list(out.values())


def _newer(old: Endpoint | None, new: Endpoint) -> Endpoint:
    """Of two endpoints at one address, the one to keep.

    Two pods can hold one address: a terminating pod whose process has exited releases its IP
    at once, and the next pod may get it while the old Pod object (and so its endpoint, marked
    terminating) lingers until its deletion completes. Nothing of the old pod runs there any
    more, so the live endpoint is the pod at that address; preferring the terminating one would
    hide a ready pod (seen on the local cluster: a rollout's new decode pod unused for ~50 s).
    """
    if old is not None and new.draining and not old.draining:
        return old
    return new


def merge_roles(prefill: list[Endpoint], decode: list[Endpoint]) -> list[Endpoint]:
    """One Endpoint per address; an address in both lists serves both roles."""
    merged: dict[str, Endpoint] = {}
    for e in [*prefill, *decode]:
        old = merged.get(e.address)
        if old is None:
            merged[e.address] = e
        elif old.name == e.name:  # one pod in both Services: colocated
            merged[e.address] = Endpoint(
                e.address, old.roles | e.roles, e.rollout_hash, e.name, old.draining or e.draining
            )
        else:  # two pods at one address: a terminated one's and the next pod's (`_newer`)
            merged[e.address] = _newer(old, e)
    return list(merged.values())


# ---- Kubernetes: the API client ----------------------------------------------------------------


@dataclass(frozen=True)
class KubeAccess:
    """Where the API server is and how to authenticate."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    verify: bool = True

    @classmethod
    def detect(cls, server: str | None = None) -> KubeAccess:
        if server:
            return cls(server.rstrip("/"), verify=False)
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if host and (_SA_DIR / "token").exists():
            h = f"[{host}]" if ":" in host else host
            return cls(
                f"https://{h}:{port}",
                token=(_SA_DIR / "token").read_text().strip(),
                ca_file=str(_SA_DIR / "ca.crt"),
            )
        from kubernetes import client, config  # kubeconfig (development outside a cluster)

        config.load_kube_config()
        c = client.Configuration.get_default_copy()
        token = (c.api_key or {}).get("authorization", "").removeprefix("Bearer ") or None
        return cls(c.host.rstrip("/"), token=token, ca_file=c.ssl_ca_cert, verify=c.verify_ssl)

    def client(self) -> httpx.AsyncClient:
        verify: bool | ssl.SSLContext = self.verify
        if self.verify and self.ca_file:
            verify = ssl.create_default_context(cafile=self.ca_file)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.AsyncClient(
            base_url=self.server,
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(30, read=None),
        )


class KubernetesDiscovery:
    """Watches the role selectors' EndpointSlices and reports the endpoint set on every change."""

    def __init__(
        self,
        access: KubeAccess,
        namespace: str,
        prefill_selector: str,
        decode_selector: str,
        on_change: Callable[[list[Endpoint]], None],
        *,
        port_name: str = GRPC_PORT_NAME,
    ) -> None:
        self.access = access
        self.namespace = namespace
        self.on_change = on_change
        self.port_name = port_name
        if prefill_selector == decode_selector:
            self._selectors = {prefill_selector: frozenset((PREFILL, DECODE))}
        else:
            self._selectors = {
                prefill_selector: frozenset((PREFILL,)),
                decode_selector: frozenset((DECODE,)),
            }
        self._slices: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in self._selectors}
        self._pods: dict[str, dict[str, Any]] = {}
        self._last: list[Endpoint] | None = None

    @property
    def _slices_path(self) -> str:
        return f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"

    async def run(self) -> None:
        async with self.access.client() as http:
            await asyncio.gather(*(self._watch(http, sel) for sel in self._selectors))

    async def _watch(self, http: httpx.AsyncClient, selector: str) -> None:
        """List, then watch from the list's resourceVersion; relist after any break."""
        while True:
            try:
                r = await http.get(self._slices_path, params={"labelSelector": selector})
                r.raise_for_status()
                body = r.json()
                self._slices[selector] = {
                    _key(s): s for s in body.get("items", []) if _matches(selector, s)
                }
                await self._publish(http)
                params = {
                    "labelSelector": selector,
                    "watch": "1",
                    "allowWatchBookmarks": "true",
                    "resourceVersion": (body.get("metadata") or {}).get("resourceVersion", ""),
                }
                async with http.stream("GET", self._slices_path, params=params) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind, obj = event.get("type"), event.get("object") or {}
                        if kind == "ERROR":
                            break  # e.g. 410 Gone: relist
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED" or not _matches(selector, obj):
                            self._slices[selector].pop(_key(obj), None)
                        else:
                            self._slices[selector][_key(obj)] = obj
                        await self._publish(http)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - any API hiccup: back off and relist
                log.warning("EndpointSlice watch (%s) failed: %s", selector, err)
            await asyncio.sleep(1.0)

    async def _publish(self, http: httpx.AsyncClient) -> None:
        names = {
            (ep.get("targetRef") or {}).get("name")
            for slices in self._slices.values()
            for s in slices.values()
            for ep in s.get("endpoints") or []
            if (ep.get("targetRef") or {}).get("kind", "Pod") == "Pod"
        }
        for name in sorted(n for n in names if n and n not in self._pods):
            r = await http.get(f"/api/v1/namespaces/{self.namespace}/pods/{name}")
            if r.status_code == 200:
                self._pods[name] = r.json()
        for name in [n for n in self._pods if n not in names]:
            del self._pods[name]  # gone pods: a new pod with the same name is re-read
        per_role = [
            slice_endpoints(self._slices[sel].values(), self._pods, roles, self.port_name)
            for sel, roles in self._selectors.items()
        ]
        endpoints = merge_roles(per_role[0], per_role[1] if len(per_role) > 1 else [])
        endpoints.sort(key=lambda e: e.address)
        if endpoints != self._last:
            self._last = endpoints
            self.on_change(endpoints)


def _matches(selector: str, obj: Mapping[str, Any]) -> bool:
    return selector_matches(selector, (obj.get("metadata") or {}).get("labels") or {})


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return meta.get("uid") or meta.get("name", "")
