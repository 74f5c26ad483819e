"""Fixtures of the end-to-end scenarios: the cluster, the image, the operator from its chart.

Session-wide, in this order: the local cluster (reused or brought up, see
splitserve.cluster.controlplane.testing), the image venv refreshed from the working tree (so every
pod runs the code under test; the node agent gives new containers the image as built now), the
converted default model staged where pods can read it, the offline reference texts (computed in
the background meanwhile), and the operator installed by `helm upgrade --install` of
charts/splitserve-operator with the chart's own RBAC. See docs/testing.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from splitserve.cluster import image, models
from splitserve.cluster.controlplane.testing import (
    KEEP_ENV,
    REQUIRE_ENV,
    ClusterHandle,
    cluster_session,
    wait_until,
)

sys.path.insert(0, str(Path(__file__).parent))

import e2e_support as S  # noqa: E402 - after the path it is found on
from hub_route import WEBHOOK_NAME, HubRoute  # noqa: E402

OPERATOR_NAMESPACE = "splitserve-e2e"
OPERATOR_RELEASE = "splitserve-operator"
OPERATOR_SELECTOR = "app.kubernetes.io/name=splitserve-operator"
OPERATOR_REPLICAS = 2  # the chart's default: one leads (Lease), one stands by
# The operator's drift timer is also what notices pods becoming ready (kopf sees only the
# InferenceService's own events): a short one keeps the scenarios quick.
RECONCILE_INTERVAL_S = 3


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    yield from cluster_session()


@pytest.fixture(scope="session")
def kubeconfig(cluster: ClusterHandle) -> Path:
    if not cluster.node:
        _unavailable("the node agent (splitserve.cluster.nodeagent) is absent: no pod can run")
    for name in ("helm", "kubectl"):
        if not S.tool(name).exists():
            _unavailable(f"{S.tool(name)} is missing: run `make tools`")
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def api(kubeconfig: Path) -> client.ApiClient:
    return kube_config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture(scope="session")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="session")
def image_config(cluster: ClusterHandle) -> image.ImageConfig:
    """The image refreshed from the working tree (seconds when only sources changed)."""
    return image.build()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    try:
        return models.stage()
    except models.ModelMissing as exc:
        _unavailable(str(exc))
        raise


@pytest.fixture(scope="session")
def offline(model_dir: Path) -> S.OfflineReference:
    """The reference texts, computed by `splitserve generate` in the background."""
    return S.OfflineReference(model_dir)


@dataclass
class OperatorInstall:
    """The operator as pods, installed from its chart (CRD, its RBAC, its Deployment of two
    replicas under a Lease), which a module may remove and the next one gets back.

    The image id goes into a pod annotation, so a changed image rolls the operator pods the way
    a new image tag would.
    """

    kubeconfig: Path
    core: client.CoreV1Api
    image_id: str
    installed: bool = False

    def ensure(self) -> str:
        """Installed and every replica Ready on the current image; returns its namespace."""
        if self.installed:
            return OPERATOR_NAMESPACE
        args = [
            "upgrade", "--install", OPERATOR_RELEASE,
            str(S.REPO / "charts" / "splitserve-operator"),
            "-n", OPERATOR_NAMESPACE, "--create-namespace",
            "--set", f"reconcileInterval={RECONCILE_INTERVAL_S}",
            "--set-string", f"podAnnotations.splitserve\\.test/image-id={self.image_id}",
            "--wait", "--timeout", "5m",
        ]  # fmt: skip
        S.checked(S.run_tool("helm", *args, kubeconfig=self.kubeconfig, timeout=360))
        wait_until("the operator pods (current image) Ready", self._ready, timeout=300)
        self.installed = True
        return OPERATOR_NAMESPACE

    def _ready(self) -> bool:
        pods = self.core.list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=OPERATOR_SELECTOR)
        live = [p for p in pods.items if p.metadata.deletion_timestamp is None]
        annotation = "splitserve.test/image-id"
        return len(live) == OPERATOR_REPLICAS and all(
            S.pod_ready(p) and (p.metadata.annotations or {}).get(annotation) == self.image_id
            for p in live
        )

    def remove(self) -> None:
        """helm uninstall, waiting until its pods are gone (a module installs its own)."""
        uninstall = ["uninstall", OPERATOR_RELEASE, "-n", OPERATOR_NAMESPACE, "--wait"]
        S.run_tool("helm", *uninstall, kubeconfig=self.kubeconfig)
        wait_until(
            "the session's operator pods gone",
            lambda: (
                not self.core.list_namespaced_pod(
                    OPERATOR_NAMESPACE, label_selector=OPERATOR_SELECTOR
                ).items
            ),
            timeout=180,
        )
        self.installed = False


@pytest.fixture(scope="session")
def operator_install(
    kubeconfig: Path, core: client.CoreV1Api, image_config: image.ImageConfig, offline
) -> Iterator[OperatorInstall]:
    install = OperatorInstall(kubeconfig, core, image_config.id[:12])
    yield install
    if install.installed and os.environ.get(KEEP_ENV) != "1":
        install.remove()


@pytest.fixture
def operator(operator_install: OperatorInstall) -> str:
    """The operator's namespace, with the operator installed and Ready."""
    return operator_install.ensure()


@pytest.fixture(scope="session")
def hub_route(kubeconfig: Path, cluster: ClusterHandle, model_dir: Path) -> Iterator[HubRoute]:
    """The hub emulator and the webhook pointing labelled namespaces' pods at it (hub_route.py)."""
    route = HubRoute(model_dir, cluster.spec.host_ip).start()
    S.checked(S.run_tool("kubectl", "apply", "-f", "-", kubeconfig=kubeconfig,
                         stdin=route.manifest()))  # fmt: skip
    yield route
    S.run_tool("kubectl", "delete", "mutatingwebhookconfiguration", WEBHOOK_NAME,
               "--ignore-not-found", kubeconfig=kubeconfig)  # fmt: skip
    route.stop()


@pytest.fixture(scope="module")
def namespaces(
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    model_dir: Path,
    operator_install: OperatorInstall,
) -> Iterator[S.Namespaces]:
    """Fresh namespaces (each with the model claim), removed when the module is done; the
    operator installed first."""
    operator_install.ensure()
    made = S.Namespaces(core, custom, model_dir)
    yield made
    made.cleanup()


@pytest.fixture(scope="session")
def node_state(cluster: ClusterHandle) -> Path:
    """The node agent's state folder (pod logs and container pids)."""
    return cluster.layout.node_state
