"""The node agent against the real control plane: probes, restarts, deletion, volumes, env.

Each test runs pods in a fresh namespace (the `namespace` fixture of tests/cluster/conftest.py)
and reads what the containers printed from the agent's per-container logs
(<node state>/pods/<ns>_<name>_<uid>/<container>.log; `kubectl logs` is not served).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from splitserve.cluster.controlplane.testing import ClusterHandle, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

IMAGE = "splitserve:dev"  # any value: the agent maps every image onto the one image venv
TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _needs_node_agent(cluster: ClusterHandle) -> None:
    if not cluster.node:
        pytest.skip("the node agent (splitserve.cluster.nodeagent) is absent: no pod can run")


def pod_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 5} | spec,
    }


def container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "command": ["python", "-c", script]} | extra


def read_pod(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def phase_in(core: client.CoreV1Api, ns: str, name: str, *phases: str) -> client.V1Pod | None:
    pod = read_pod(core, ns, name)
    return pod if pod is not None and pod.status.phase in phases else None


def log_of(cluster: ClusterHandle, pod: client.V1Pod, container_name: str) -> str:
    m = pod.metadata
    path = cluster.layout.node_state / "pods" / f"{m.namespace}_{m.name}_{m.uid}"
    log = path / f"{container_name}.log"
    return log.read_text() if log.exists() else ""


def is_ready(pod: client.V1Pod | None) -> bool:
    conditions = (pod.status.conditions or []) if pod else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def test_http_pod_gets_ready_with_an_ip_the_host_reaches(
    core: client.CoreV1Api, namespace: str
) -> None:
    web = container(
        "web",
        "",
        command=["python", "-m", "http.server", "8080"],
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        startupProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 30},
    )
    began = time.monotonic()
    core.create_namespaced_pod(namespace, pod_manifest("web", [web]))
    pod = wait_until(
        "web Ready",
        lambda: (p := read_pod(core, namespace, "web")) and is_ready(p) and p,
        timeout=TIMEOUT_S,
    )
    took = time.monotonic() - began
    status = pod.status.container_statuses[0]
    assert status.ready and status.started and status.state.running
    assert pod.status.host_ip == pod.status.pod_ip.rsplit(".", 1)[0] + ".1"
    with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/", timeout=10) as resp:
        assert resp.status == 200
    print(f"pod created -> Ready in {took:.1f} s")


def test_failing_liveness_probe_restarts_the_container(
    core: client.CoreV1Api, namespace: str
) -> None:
    # Healthy for ~2 s, then the liveness file goes away: killed, restarted, again and again.
    script = (
        "import os, time\nopen('/tmp/alive', 'w').close()\ntime.sleep(2)\n"
        "os.remove('/tmp/alive')\ntime.sleep(600)\n"
    )
    live = container(
        "live",
        script,
        livenessProbe={
            "exec": {"command": ["cat", "/tmp/alive"]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    )
    core.create_namespaced_pod(
        namespace, pod_manifest("live", [live], terminationGracePeriodSeconds=1)
    )

    def restarted() -> client.V1ContainerStatus | None:
        pod = read_pod(core, namespace, "live")
        statuses = (pod.status.container_statuses or []) if pod else []
        return statuses[0] if statuses and statuses[0].restart_count >= 2 else None

    status = wait_until("liveness restarts (restartCount >= 2)", restarted, timeout=TIMEOUT_S)
    last = status.last_state.terminated
    assert last is not None and last.exit_code == 137 and last.reason == "Error"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=live")
    assert {"Unhealthy", "Killing"} <= {e.reason for e in events.items}


def test_graceful_delete_runs_prestop_then_sigterm(
    cluster: ClusterHandle, core: client.CoreV1Api, namespace: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    script = (
        "import signal, sys, time\n"
        "def term(*_):\n"
        "    open('/out/sigterm', 'w').write(str(time.time()))\n    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\nprint('up', flush=True)\ntime.sleep(600)\n"
    )
    pre_stop = {"exec": {"command": ["sh", "-c", "date +%s.%N > /out/prestop"]}}
    c = container(
        "app",
        script,
        lifecycle={"preStop": pre_stop},
        volumeMounts=[{"name": "out", "mountPath": "/out"}],
    )
    manifest = pod_manifest(
        "grace",
        [c],
        terminationGracePeriodSeconds=20,
        volumes=[{"name": "out", "hostPath": {"path": str(out)}}],
    )
    core.create_namespaced_pod(namespace, manifest)
    wait_until("grace Running", lambda: phase_in(core, namespace, "grace", "Running"), TIMEOUT_S)
    began = time.monotonic()
    core.delete_namespaced_pod("grace", namespace)
    wait_until("grace deleted", lambda: read_pod(core, namespace, "grace") is None, timeout=60)
    assert time.monotonic() - began < 15  # the process exited on SIGTERM: no waiting out 20 s
    prestop, sigterm = (float((out / f).read_text()) for f in ("prestop", "sigterm"))
    assert prestop <= sigterm  # preStop first, then SIGTERM


def test_force_delete_kills_at_once(core: client.CoreV1Api, namespace: str) -> None:
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    # PID 1 without a SIGTERM handler ignores SIGTERM: only SIGKILL stops it.
    c = container("stubborn", f"import time; time.sleep(600)  # {marker}")
    core.create_namespaced_pod(
        namespace, pod_manifest("stubborn", [c], terminationGracePeriodSeconds=300)
    )
    wait_until(
        "stubborn Running", lambda: phase_in(core, namespace, "stubborn", "Running"), TIMEOUT_S
    )
    running = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert running.strip()
    began = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=0)
    assert read_pod(core, namespace, "stubborn") is None  # --force: the object goes at once

    def gone() -> bool:
        return not subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout.strip()

    wait_until("the force-deleted pod's process killed", gone, timeout=30)
    assert time.monotonic() - began < 15


def test_pvc_on_a_hostpath_pv_is_mounted_read_only(
    cluster: ClusterHandle,
    api: client.ApiClient,
    core: client.CoreV1Api,
    namespace: str,
    tmp_path: Path,
) -> None:
    data = tmp_path / "model"
    data.mkdir()
    (data / "config.json").write_text('{"model": "tiny"}')
    for p in (tmp_path, data):
        os.chmod(p, 0o755)
    pv_name = f"pv-{namespace}"
    core.create_persistent_volume(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": str(data)},
                "claimRef": {"namespace": namespace, "name": "model"},
            },
        }
    )
    try:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "model"},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        script = (
            "import os\nprint('read', open('/models/model/config.json').read())\n"
            "try:\n    open('/models/model/x', 'w')\nexcept OSError as e:\n"
            "    print('write', e.strerror)\nprint('uid', os.getuid())\n"
        )
        c = container(
            "reader",
            script,
            volumeMounts=[{"name": "m", "mountPath": "/models/model", "readOnly": True}],
        )
        manifest = pod_manifest(
            "reader",
            [c],
            restartPolicy="Never",
            volumes=[
                {"name": "m", "persistentVolumeClaim": {"claimName": "model", "readOnly": True}}
            ],
        )
        core.create_namespaced_pod(namespace, manifest)
        pod = wait_until(
            "reader finished",
            lambda: phase_in(core, namespace, "reader", "Succeeded", "Failed"),
            timeout=TIMEOUT_S,
        )
        output = log_of(cluster, pod, "reader")
        assert pod.status.phase == "Succeeded", output
        assert 'read {"model": "tiny"}' in output
        assert "write Read-only file system" in output
        assert "uid 10001" in output  # the image's USER
        assert not (data / "x").exists()
    finally:
        core.delete_persistent_volume(pv_name)


def test_env_downward_api_config_and_token_files(
    cluster: ClusterHandle, core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello", "MODE": "fast"}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "sec"}, "stringData": {"password": "p4ss"}}
    )
    script = (
        "import os\nfor k in ('POD_NAME','POD_IP','NODE','MODE','PW','MSG','HOSTNAME','HOME',"
        "'KUBERNETES_SERVICE_HOST','PYTHONSAFEPATH'):\n    print(k, os.environ.get(k))\n"
        "print('cwd', os.getcwd())\n"
        "print('file', open('/etc/cfg/greeting').read())\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "print('ns', open(sa + '/namespace').read())\n"
        "print('token', len(open(sa + '/token').read()) > 100)\n"
        "print('ca', open(sa + '/ca.crt').read().startswith('-----BEGIN CERTIFICATE'))\n"
    )
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "MSG", "value": "$(POD_NAME) on $(NODE)"},
    ]
    c = container(
        "env",
        script,
        env=env,
        envFrom=[{"configMapRef": {"name": "cfg"}}],
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"}],
    )
    manifest = pod_manifest(
        "env", [c], restartPolicy="Never", volumes=[{"name": "cfg", "configMap": {"name": "cfg"}}]
    )
    core.create_namespaced_pod(namespace, manifest)
    pod = wait_until(
        "env finished",
        lambda: phase_in(core, namespace, "env", "Succeeded", "Failed"),
        timeout=TIMEOUT_S,
    )
    out = dict(
        line.split(" ", 1) for line in log_of(cluster, pod, "env").splitlines() if " " in line
    )
    assert pod.status.phase == "Succeeded", out
    assert out["POD_NAME"] == "env" and out["POD_IP"] == pod.status.pod_ip
    assert out["NODE"] == cluster.spec.node_name and out["MODE"] == "fast" and out["PW"] == "p4ss"
    assert out["MSG"] == f"env on {cluster.spec.node_name}" and out["HOSTNAME"] == "env"
    assert out["HOME"] == "/home/splitserve" and out["cwd"] == "/home/splitserve"
    assert out["PYTHONSAFEPATH"] == "1" and out["KUBERNETES_SERVICE_HOST"]
    assert out["file"] == "hello" and out["ns"] == namespace
    assert out["token"] == "True" and out["ca"] == "True"


def test_init_containers_run_in_order_before_the_app(
    cluster: ClusterHandle, core: client.CoreV1Api, namespace: str
) -> None:
    init = [
        container(
            "first",
            "open('/work/order', 'a').write('first ')",
            volumeMounts=[{"name": "w", "mountPath": "/work"}],
        ),
        container(
            "second",
            "open('/work/order', 'a').write('second ')",
            volumeMounts=[{"name": "w", "mountPath": "/work"}],
        ),
    ]
    app = container(
        "app",
        "print(open('/work/order').read() + 'app')",
        volumeMounts=[{"name": "w", "mountPath": "/work"}],
    )
    manifest = pod_manifest(
        "ordered",
        [app],
        initContainers=init,
        restartPolicy="Never",
        volumes=[{"name": "w", "emptyDir": {}}],
    )
    core.create_namespaced_pod(namespace, manifest)
    pod = wait_until(
        "ordered finished",
        lambda: phase_in(core, namespace, "ordered", "Succeeded", "Failed"),
        timeout=TIMEOUT_S,
    )
    assert pod.status.phase == "Succeeded"
    assert log_of(cluster, pod, "app").strip() == "first second app"
    states = [s.state.terminated for s in pod.status.init_container_statuses]
    assert [s.exit_code for s in states] == [0, 0] and all(s.reason == "Completed" for s in states)
