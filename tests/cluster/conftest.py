"""Fixtures of the control-plane smoke tests: one cluster per session, a fresh namespace per test.

The cluster is brought up (or a healthy one reused) by splitserve.cluster.controlplane.testing;
see docs/testing.md for the skip/fail rules (SPLITSERVE_REQUIRE_CLUSTER) and
SPLITSERVE_KEEP_CLUSTER.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from splitserve.cluster.controlplane.testing import ClusterHandle, cluster_session, wait_until

TEST_LABEL = "splitserve.test/suite"


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    yield from cluster_session()


@pytest.fixture(scope="session")
def api(cluster: ClusterHandle) -> client.ApiClient:
    """A client authenticated as the admin (system:masters)."""
    return kube_config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    """A new namespace, once its `default` ServiceAccount exists (pods are refused before)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    meta = client.V1ObjectMeta(name=name, labels={TEST_LABEL: "cluster"})
    core.create_namespace(client.V1Namespace(metadata=meta))
    wait_until(
        f"ServiceAccount {name}/default (serviceaccount controller)",
        lambda: core.read_namespaced_service_account("default", name),
        timeout=120,
    )
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
