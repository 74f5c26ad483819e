"""`url NAMESPACE/SERVICE [PORT]`: an http:// address on this host that reaches a Service.

With kube-proxy running, the Service's ClusterIP:port (kube-proxy's nat OUTPUT rules carry the
host's own connections to a ready endpoint, as they would on a node). Without it, or for a
headless Service, a ready endpoint's pod IP and target port straight over the bridge (the pod
network is local to this host).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.cluster.controlplane.health import Probe


class ServiceUrlError(RuntimeError):
    """The Service, the port or a ready endpoint is missing; the message says which."""


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ServiceRef:
        namespace, sep, name = text.partition("/")
        if not sep or not namespace or not name or "/" in name:
            raise ServiceUrlError(f"expected NAMESPACE/SERVICE, got {text!r}")
        return cls(namespace, name)


def pick_port(service: dict, wanted: str | None) -> dict:
    """The Service port matching `wanted` (a number or a port name), or its only port."""
    ports = service.get("spec", {}).get("ports", [])
    if not ports:
        raise ServiceUrlError("the Service has no ports")
    if wanted is None:
        if len(ports) == 1:
            return ports[0]
        names = ", ".join(f"{p.get('name', '?')}={p['port']}" for p in ports)
        raise ServiceUrlError(f"the Service has several ports ({names}): name one")
    for port in ports:
        if wanted in (str(port["port"]), port.get("name")):
            return port
    raise ServiceUrlError(f"the Service has no port {wanted!r}")


def service_url(api: Probe, ref: ServiceRef, port: str | None, proxy_running: bool) -> str:
    """The address; raises ServiceUrlError."""
    ns, name = ref.namespace, ref.name
    service = api.get_json(f"/api/v1/namespaces/{ns}/services/{name}")
    if service is None:
        raise ServiceUrlError(f"no Service {ns}/{name}")
    chosen = pick_port(service, port)
    cluster_ip = service.get("spec", {}).get("clusterIP")
    if proxy_running and cluster_ip and cluster_ip != "None":
        return f"http://{cluster_ip}:{chosen['port']}"
    return _endpoint_url(api, ref, chosen)


def _endpoint_url(api: Probe, ref: ServiceRef, port: dict) -> str:
    query = f"labelSelector=kubernetes.io%2Fservice-name%3D{ref.name}"
    path = f"/apis/discovery.k8s.io/v1/namespaces/{ref.namespace}/endpointslices?{query}"
    slices = (api.get_json(path) or {}).get("items", [])
    for item in slices:
        target = next(
            (
                p["port"]
                for p in item.get("ports") or []
                if p.get("name", "") == port.get("name", "")
            ),
            None,
        )
        if target is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if endpoint.get("conditions", {}).get("ready") and endpoint.get("addresses"):
                return f"http://{endpoint['addresses'][0]}:{target}"
    raise ServiceUrlError(f"Service {ref.namespace}/{ref.name} has no ready endpoint")
