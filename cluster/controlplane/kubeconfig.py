"""Kubeconfig files, one per client identity, with the certificates embedded.

Embedded data (not file paths) keeps each file self-contained: a test or the node agent can copy
it anywhere. All of them point at the loopback address; pods reach the API server through
10.244.0.1 or the `kubernetes` Service instead, with the CA file and a service-account token.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

from splitserve.cluster.controlplane.layout import ClusterSpec, Layout
from splitserve.cluster.controlplane.pki import Pki, identities

CLUSTER_NAME = "splitserve"


def render(server: str, ca: bytes, cert: bytes, key: bytes, user: str) -> dict:
    """The kubeconfig document for one user of one cluster."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CLUSTER_NAME,
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            }
        ],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }


def write_all(layout: Layout, spec: ClusterSpec, pki: Pki) -> None:
    """(Re)write every identity's kubeconfig; cheap, so `up` always does it."""
    layout.kubeconfigs.mkdir(parents=True, exist_ok=True)
    ca = pki.ca_cert.read_bytes()
    for ident in identities(spec):
        doc = render(
            spec.apiserver_url,
            ca,
            pki.client_cert(ident.name).read_bytes(),
            pki.client_key(ident.name).read_bytes(),
            ident.common_name,
        )
        _write_private(layout.kubeconfig(ident.name), yaml.safe_dump(doc, sort_keys=False))


def _write_private(path: Path, text: str) -> None:
    # Unchanged files are left alone: running programs may watch what they read.
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    tmp.replace(path)
