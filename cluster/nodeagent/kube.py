"""API server access as plain JSON dicts, every call under a timeout.

The agent talks to the API server with the node's own identity (system:node:<name>), so what it
may do is what the Node authorizer and NodeRestriction allow kubelet: its own Node and Lease, pods
bound to it (status, delete), and the Secrets, ConfigMaps, PVCs, PVs and service-account tokens
those pods reference - read one by one, never listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
JSON = "application/json"

__all__ = ["ApiException", "Kube", "describe", "is_status", "is_transient"]


def describe(exc: BaseException) -> str:
    """One line for an API error: status code and the API server's message."""
    if not isinstance(exc, ApiException):
        return str(exc)
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    return f"{exc.status} {message}"


def is_transient(exc: BaseException) -> bool:
    """An API call that failed for a reason the next attempt may not meet: a timeout, a
    refused or reset connection, throttling, or a server error (kubelet retries these)."""
    import urllib3

    if isinstance(exc, ApiException):
        return exc.status is not None and (exc.status >= 500 or exc.status == 429)
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError))


def is_status(exc: BaseException, *codes: int) -> bool:
    """Whether an exception is an API error with one of these HTTP status codes."""
    return isinstance(exc, ApiException) and exc.status in codes


class Kube:
    """A thin JSON client: `request` for one call, `watch` for a stream of events."""

    def __init__(self, kubeconfig: Path, timeout_s: float = 15.0) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self._api = client.ApiClient(cfg)
        self.timeout_s = timeout_s

    def _send(
        self,
        method: str,
        path: str,
        query: dict[str, Any],
        body: Any,
        content_type: str,
        timeout: tuple[float, float],
    ) -> Any:
        m, url, headers, data, post = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()),
            header_params={"Accept": JSON, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(m, url, headers, data, post, _request_timeout=timeout)
        if resp.status >= 400:
            raw = resp.read()
            raise ApiException(
                status=resp.status, reason=resp.reason, body=raw.decode(errors="replace")
            )
        return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = JSON,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One API call; returns the decoded JSON body, raises ApiException on HTTP errors."""
        timeout = timeout_s or self.timeout_s
        resp = self._send(
            method, path, query or {}, body, content_type, (min(5.0, timeout), timeout)
        )
        raw = resp.read()
        return json.loads(raw) if raw else {}

    def get(self, path: str, **kw: Any) -> dict[str, Any] | None:
        """GET an object; None when it does not exist."""
        try:
            return self.request("GET", path, **kw)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def watch(
        self, path: str, query: dict[str, Any], server_timeout_s: int = 240
    ) -> Iterator[dict[str, Any]]:
        """Events of one watch request (ends when the server closes it or the socket stalls)."""
        q = dict(query) | {"watch": "true", "timeoutSeconds": str(server_timeout_s)}
        resp = self._send("GET", path, q, None, JSON, (5.0, server_timeout_s + 30.0))
        http = resp.response  # urllib3's, not yet read
        try:
            buffer = b""
            for chunk in http.stream(65536, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            http.release_conn()

    def server_version(self) -> str:
        """The API server's gitVersion (the node reports a kubelet version no newer)."""
        return str(self.request("GET", "/version").get("gitVersion", "v0.0.0"))
