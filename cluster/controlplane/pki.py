"""The cluster's PKI, made once with the openssl CLI: a CA, the API server's serving certificate,
the service-account signing key pair, and one client certificate per identity.

Kubernetes authenticates a client certificate as user = CN, groups = O; the identities below are
the ones the default RBAC bindings expect (system:kube-controller-manager, system:kube-scheduler,
system:kube-proxy) plus the admin (system:masters) and the node agent's node identity
(system:node:<name> in system:nodes, which the Node authorizer and NodeRestriction key on).

The whole folder is written to a temporary sibling and renamed into place, so a crash midway
never leaves a half-made PKI; a complete one is reused as is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from splitserve.cluster.controlplane.layout import ClusterSpec

DAYS = 3650
KEY = ("-newkey", "rsa:2048", "-nodes")
# An empty config: nothing from the system openssl.cnf (whose x509 defaults mark certs as CAs).
MINIMAL_CONFIG = "[req]\ndistinguished_name = dn\n[dn]\n"


@dataclass(frozen=True)
class Identity:
    """A client certificate's file stem and subject."""

    name: str
    common_name: str
    organization: str | None = None

    @property
    def subject(self) -> str:
        org = f"/O={self.organization}" if self.organization else ""
        return f"{org}/CN={self.common_name}"


def identities(spec: ClusterSpec) -> tuple[Identity, ...]:
    """The client identities, one kubeconfig each (see kubeconfig.py)."""
    return (
        Identity("admin", "splitserve-admin", "system:masters"),
        Identity("kube-controller-manager", "system:kube-controller-manager"),
        Identity("kube-scheduler", "system:kube-scheduler"),
        Identity("kube-proxy", "system:kube-proxy"),
        Identity("node", f"system:node:{spec.node_name}", "system:nodes"),
    )


def serving_sans(spec: ClusterSpec) -> tuple[str, ...]:
    """Every name a client may use for the API server: loopback, the bridge, the Service."""
    domain = spec.cluster_domain
    return (
        "IP:127.0.0.1",
        f"IP:{spec.host_ip}",
        f"IP:{spec.kubernetes_service_ip}",
        "DNS:localhost",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        f"DNS:kubernetes.default.svc.{domain}",
    )


@dataclass(frozen=True)
class Pki:
    """Paths of a complete PKI folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def apiserver_cert(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        """The service-account signing key (private): the API server signs, the controller
        manager's token controller signs legacy tokens."""
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def client_cert(self, identity: str) -> Path:
        return self.root / f"{identity}.crt"

    def client_key(self, identity: str) -> Path:
        return self.root / f"{identity}.key"

    def files(self, spec: ClusterSpec) -> list[Path]:
        names = [self.ca_cert, self.ca_key, self.apiserver_cert, self.apiserver_key]
        names += [self.sa_key, self.sa_pub]
        for ident in identities(spec):
            names += [self.client_cert(ident.name), self.client_key(ident.name)]
        return names

    def complete(self, spec: ClusterSpec) -> bool:
        return all(path.is_file() for path in self.files(spec))


def ensure_pki(root: Path, spec: ClusterSpec) -> Pki:
    """Return the PKI under `root`, generating the whole of it first if any file is missing."""
    pki = Pki(root)
    if pki.complete(spec):
        return pki
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found on PATH (run `make cluster-deps`)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pki-", dir=root.parent))
    try:
        _generate(Pki(tmp), spec)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pki


def _generate(pki: Pki, spec: ClusterSpec) -> None:
    config = pki.root / "openssl.cnf"
    config.write_text(MINIMAL_CONFIG)
    base = ("openssl", "req", "-config", str(config), "-x509", "-days", str(DAYS), *KEY)
    _openssl(
        *base,
        "-keyout", str(pki.ca_key),
        "-out", str(pki.ca_cert),
        "-subj", "/CN=splitserve-cluster-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    signed = (*base, "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key))
    leaf = ("-addext", "basicConstraints=critical,CA:FALSE")
    leaf += ("-addext", "keyUsage=critical,digitalSignature,keyEncipherment")
    _openssl(
        *signed,
        *leaf,
        "-keyout", str(pki.apiserver_key),
        "-out", str(pki.apiserver_cert),
        "-subj", "/CN=kube-apiserver",
        "-addext", "extendedKeyUsage=serverAuth",
        "-addext", "subjectAltName=" + ",".join(serving_sans(spec)),
    )  # fmt: skip
    for ident in identities(spec):
        _openssl(
            *signed,
            *leaf,
            "-keyout", str(pki.client_key(ident.name)),
            "-out", str(pki.client_cert(ident.name)),
            "-subj", ident.subject,
            "-addext", "extendedKeyUsage=clientAuth",
        )  # fmt: skip
    _openssl("openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(pki.sa_key))  # fmt: skip
    _openssl("openssl", "pkey", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    for path in pki.root.glob("*.key"):
        os.chmod(path, 0o600)
    config.unlink()


def _openssl(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"openssl failed ({' '.join(argv[:2])}): {' | '.join(tail)}")
