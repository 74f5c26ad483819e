"""How the operator reaches the API server: the pod's service account, else a kubeconfig.

In a pod this is client-go's in-cluster configuration: the address from
``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` (set by the kubelet for every pod), the
projected token and CA under ``/var/run/secrets/kubernetes.io/serviceaccount``. kopf's own
service-account login hard-codes ``https://kubernetes.default.svc``, which needs cluster DNS;
the environment variables do not (and are what every other Kubernetes client uses). The token is
read anew on every login: kopf and our client log in again on a 401, and projected tokens rotate.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import kopf

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

log = logging.getLogger("splitserve.operator")


def in_cluster_server(environ: dict[str, str] | None = None) -> str | None:
    """``https://HOST:PORT`` of the API server from the pod's environment, or None."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"https://{host}:{port}"


def login_in_cluster(
    account_dir: Path = SERVICE_ACCOUNT_DIR, environ: dict[str, str] | None = None
) -> kopf.ConnectionInfo | None:
    """The pod's service-account credentials, or None outside a pod."""
    server = in_cluster_server(environ)
    token_path = account_dir / "token"
    if server is None or not token_path.is_file():
        return None
    ca_path = account_dir / "ca.crt"
    namespace_path = account_dir / "namespace"
    namespace = namespace_path.read_text().strip() if namespace_path.is_file() else None
    return kopf.ConnectionInfo(
        server=server,
        token=token_path.read_text().strip() or None,
        ca_path=str(ca_path) if ca_path.is_file() else None,
        default_namespace=namespace or None,
        priority=1000,  # as kopf's service-account login
    )


def default_login() -> kopf.ConnectionInfo:
    """In a pod: its service account; elsewhere: the kubeconfig (via the kubernetes client,
    which also runs exec credential plugins, then kopf's own reader)."""
    info = login_in_cluster()
    if info is not None:
        return info
    settings = kopf.OperatorSettings()
    try:
        info = kopf.login_via_client(logger=log, settings=settings)
    except Exception:  # any failure: fall back to kopf's own kubeconfig reader
        info = None
    info = info or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("neither a service account nor a kubeconfig is available")
    return info
