"""Which API failures the node agent retries rather than letting a pod's worker die."""

from __future__ import annotations

import urllib3
from kubernetes.client.rest import ApiException

from splitserve.cluster.nodeagent.kube import is_transient


def test_timeouts_and_server_errors_are_transient() -> None:
    timeout = urllib3.exceptions.ReadTimeoutError(None, "/api", "Read timed out.")
    assert is_transient(urllib3.exceptions.MaxRetryError(None, "/api", timeout))
    assert is_transient(ConnectionResetError())
    assert is_transient(ApiException(status=503)) and is_transient(ApiException(status=429))


def test_client_errors_are_not() -> None:
    assert not is_transient(ApiException(status=404))
    assert not is_transient(ApiException(status=422))
    assert not is_transient(ValueError("bad spec"))
