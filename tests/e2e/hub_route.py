"""The test cluster's route to "the hub": the hub emulator, and a webhook that points pods at it.

No hub is reachable from these machines. Manifests that name an `hf://` model (the examples, the
README quickstart) are applied exactly as written; what stands in for the internet is this:

- `HubEmulator` (tests/fixtures/hub_emulator.py) serves the staged default model as
  `HuggingFaceTB/SmolLM2-135M-Instruct` (public) and as `splitserve-test/gated-smollm2`
  (gated: only `GATED_TOKEN` may download), from the host, which pods reach at the bridge's
  address;
- a mutating admission webhook, called by the real API server for pods created in namespaces
  labelled `splitserve.test/hub-route=emulated`, adds `HF_ENDPOINT=<the emulator>` to their
  `model-download` init containers, the way a platform's policy engine (Kyverno, Gatekeeper
  mutations) injects a hub mirror or proxy settings. Nothing else of a pod is changed, and
  pods elsewhere are not touched.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hub_emulator import HubEmulator

ROUTE_LABEL = "splitserve.test/hub-route"
ROUTE_VALUE = "emulated"
WEBHOOK_NAME = "hub-route.splitserve.test"
PUBLIC_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
GATED_REPO = "splitserve-test/gated-smollm2"
GATED_TOKEN = "hf_e2e_gated_token"
DOWNLOAD_CONTAINER = "model-download"


def _self_signed(host: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``host`` (an IP address), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub-route webhook")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def env_patch(pod: dict, endpoint: str) -> list[dict]:
    """JSON patch operations adding HF_ENDPOINT to the pod's download init containers."""
    ops = []
    for i, c in enumerate((pod.get("spec") or {}).get("initContainers") or []):
        if c.get("name") != DOWNLOAD_CONTAINER:
            continue
        env = c.get("env")
        if env is None:
            ops.append({"op": "add", "path": f"/spec/initContainers/{i}/env", "value": []})
        if any(e.get("name") == "HF_ENDPOINT" for e in env or []):
            continue
        entry = {"name": "HF_ENDPOINT", "value": endpoint}
        ops.append({"op": "add", "path": f"/spec/initContainers/{i}/env/-", "value": entry})
    return ops


@dataclass
class HubRoute:
    """The emulator plus the webhook server; `start()`, then `manifest()` to register it."""

    model_dir: Path
    pod_side_host: str  # the address pods reach the host at (the bridge's)
    hub: HubEmulator = field(init=False)
    mutated: list[str] = field(default_factory=list)  # namespace/pod of each patched pod
    _server: ThreadingHTTPServer | None = None
    _ca: bytes = b""

    def start(self) -> HubRoute:
        self.hub = HubEmulator(host="0.0.0.0").start()
        self.hub.add_repo(PUBLIC_REPO, self.model_dir)
        self.hub.add_repo(GATED_REPO, self.model_dir, token=GATED_TOKEN)
        self._start_webhook()
        return self

    @property
    def endpoint(self) -> str:
        """The hub as pods reach it."""
        return self.hub.url_for(self.pod_side_host)

    def _start_webhook(self) -> None:
        cert, key = _self_signed("127.0.0.1")
        self._ca = cert
        route = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = review["request"]
                pod = request.get("object") or {}
                ops = env_patch(pod, route.endpoint)
                response = {"uid": request["uid"], "allowed": True}
                if ops:
                    meta = pod.get("metadata") or {}
                    name = meta.get("name") or meta.get("generateName", "")
                    route.mutated.append(f"{request.get('namespace')}/{name}")
                    response["patchType"] = "JSONPatch"
                    response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
                body = json.dumps(
                    {
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": response,
                    }  # fmt: skip
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert_path.write_bytes(cert)
            key_path.write_bytes(key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_path, key_path)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def manifest(self) -> str:
        """The MutatingWebhookConfiguration, as YAML for `kubectl apply -f -`."""
        assert self._server is not None
        port = self._server.server_address[1]
        config = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": WEBHOOK_NAME},
            "webhooks": [
                {
                    "name": WEBHOOK_NAME,
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{port}/mutate",
                        "caBundle": base64.b64encode(self._ca).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                            "scope": "Namespaced",
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {ROUTE_LABEL: ROUTE_VALUE}},
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                }
            ],
        }
        return json.dumps(config)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.hub.stop()
