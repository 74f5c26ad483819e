"""The cluster tooling's own pieces, without a cluster: PKI, pid files, Service URL choice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from splitserve.cluster.controlplane import processes
from splitserve.cluster.controlplane.health import NotReady, wait_for
from splitserve.cluster.controlplane.kubeconfig import render
from splitserve.cluster.controlplane.layout import ClusterSpec
from splitserve.cluster.controlplane.pki import ensure_pki, identities
from splitserve.cluster.controlplane.service_url import (
    ServiceRef,
    ServiceUrlError,
    pick_port,
    service_url,
)


def openssl_text(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


@pytest.mark.skipif(subprocess.run(["which", "openssl"]).returncode != 0, reason="no openssl")
def test_pki_is_made_once_with_the_identities_kubernetes_expects(tmp_path: Path) -> None:
    spec = ClusterSpec()
    pki = ensure_pki(tmp_path / "pki", spec)
    serving = openssl_text(pki.apiserver_cert)
    for name in ("IP Address:10.96.0.1", "IP Address:10.244.0.1", "DNS:kubernetes.default.svc"):
        assert name in serving
    assert "TLS Web Server Authentication" in serving
    node = openssl_text(pki.client_cert("node"))
    assert "O = system:nodes, CN = system:node:splitserve-node-0" in node
    assert "TLS Web Client Authentication" in node
    for ident in identities(spec):
        subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.ca_cert), str(pki.client_cert(ident.name))],
            check=True,
            capture_output=True,
            timeout=30,
        )
    assert (pki.ca_key.stat().st_mode & 0o777) == 0o600
    before = pki.ca_cert.read_bytes()
    assert ensure_pki(tmp_path / "pki", spec).ca_cert.read_bytes() == before  # reused


def test_kubeconfig_embeds_the_credentials() -> None:
    doc = render("https://127.0.0.1:6443", b"CA", b"CERT", b"KEY", "system:kube-proxy")
    text = yaml.safe_dump(doc)
    loaded = yaml.safe_load(text)
    assert loaded["current-context"] == "splitserve"
    assert loaded["users"][0]["user"]["client-certificate-data"] == "Q0VSVA=="


def test_pid_file_names_only_the_process_it_started(tmp_path: Path) -> None:
    spec = processes.ProcessSpec("sleeper", (sys.executable, "-c", "import time; time.sleep(60)"))
    pidfile, log = tmp_path / "run" / "sleeper.pid", tmp_path / "sleeper.log"
    started = processes.start(spec, pidfile, log)
    assert processes.read_pid(pidfile) == started.proc.pid
    assert "starting:" in log.read_text()
    assert processes.stop(pidfile, timeout=10)
    assert started.proc.wait(timeout=10) is not None
    assert not pidfile.exists()
    assert not processes.stop(pidfile, timeout=1)  # idempotent

    # A pid file naming a live pid with another start time is someone else's process.
    me = os.getpid()
    pidfile.write_text(f"{me} {processes.start_time(me)}\n")
    assert processes.read_pid(pidfile) == me
    pidfile.write_text(f"{me} 1\n")
    assert processes.read_pid(pidfile) is None


def test_service_port_choice() -> None:
    one = {"spec": {"ports": [{"port": 80, "name": "http"}]}}
    two = {"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 9090, "name": "metrics"}]}}
    assert pick_port(one, None)["port"] == 80
    assert pick_port(two, "metrics")["port"] == 9090
    assert pick_port(two, "9090")["name"] == "metrics"
    with pytest.raises(ServiceUrlError, match="several ports"):
        pick_port(two, None)
    with pytest.raises(ServiceUrlError, match="no port"):
        pick_port(two, "grpc")
    assert ServiceRef.parse("ns/web") == ServiceRef("ns", "web")
    with pytest.raises(ServiceUrlError):
        ServiceRef.parse("web")


def test_a_wait_ends_at_once_when_the_program_exits(tmp_path: Path) -> None:
    spec = processes.ProcessSpec("boom", ("sh", "-c", "echo bad flag; exit 3"))
    log = tmp_path / "boom.log"
    started = processes.start(spec, tmp_path / "boom.pid", log)
    with pytest.raises(NotReady, match=rf"boom exited with code 3 .*see {log}"):
        wait_for("boom", lambda: False, timeout=120, log=log, watch=[started])
    with pytest.raises(NotReady, match=rf"never not ready after 1 s: see {log}"):
        wait_for("never", lambda: False, timeout=1, log=log)


def test_supervisor_restarts_until_told_to_stop(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    child = f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(1)"
    spec = processes.ProcessSpec(
        "flaky",
        (sys.executable, "-P", "-m", "splitserve.cluster.controlplane.supervise", "--",
         sys.executable, "-c", child),
    )  # fmt: skip
    pidfile = tmp_path / "flaky.pid"
    started = processes.start(spec, pidfile, tmp_path / "flaky.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(runs.read_text() if runs.exists() else "") < 2:
        time.sleep(0.2)
    assert len(runs.read_text()) >= 2  # exited, and was started again
    assert processes.stop(pidfile, timeout=10)
    assert started.proc.wait(timeout=10) is not None
    assert "restarting in" in (tmp_path / "flaky.log").read_text()


class FakeApi:
    """Answers get_json from a dict of path prefixes (what service_url reads)."""

    def __init__(self, answers: dict[str, dict]) -> None:
        self.answers = answers

    def get_json(self, path: str) -> dict | None:
        return next((doc for prefix, doc in self.answers.items() if path.startswith(prefix)), None)


def test_service_url_uses_the_cluster_ip_or_else_a_ready_endpoint() -> None:
    service = {"spec": {"clusterIP": "10.96.7.7", "ports": [{"name": "http", "port": 80}]}}
    slices = {
        "items": [
            {
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [
                    {"addresses": ["10.244.0.9"], "conditions": {"ready": False}},
                    {"addresses": ["10.244.0.5"], "conditions": {"ready": True}},
                ],
            }
        ]
    }
    api = FakeApi(
        {
            "/api/v1/namespaces/ns/services/web": service,
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices": slices,
        }
    )
    ref = ServiceRef("ns", "web")
    assert service_url(api, ref, None, proxy_running=True) == "http://10.96.7.7:80"
    assert service_url(api, ref, "http", proxy_running=False) == "http://10.244.0.5:8080"
    with pytest.raises(ServiceUrlError, match="no Service ns/other"):
        service_url(api, ServiceRef("ns", "other"), None, proxy_running=True)
