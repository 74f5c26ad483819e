"""Probes and bounded waits: every wait ends, and its failure names what did not come up and the
log file to read.

The API calls here (readiness, the Node, a Service) use the standard library with the admin
client certificate: the control-plane tooling needs no Kubernetes client package.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from splitserve.cluster.controlplane.processes import Started

POLL_S = 0.5


class NotReady(RuntimeError):
    """A wait ran out, or the program it waited for exited; the message says which and where
    to look."""


@dataclass(frozen=True)
class Probe:
    """An HTTP(S) GET that counts as healthy on a 200."""

    url: str
    ca: Path | None = None
    cert: tuple[Path, Path] | None = None  # client certificate and key
    insecure: bool = False  # the components' self-signed serving certs on loopback

    def context(self) -> ssl.SSLContext | None:
        if urlsplit(self.url).scheme != "https":
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert:
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
        return ctx

    def get(self, path_suffix: str = "", timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of GET url+suffix; raises OSError when nothing answers."""
        parts = urlsplit(self.url + path_suffix)
        ctx = self.context()
        conn: http.client.HTTPConnection
        if ctx is not None:
            conn = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target or "/")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path_suffix: str = "", timeout: float = 5.0) -> dict | None:
        """The decoded body of a 200, None for a 404; raises OSError otherwise."""
        status, body = self.get(path_suffix, timeout)
        if status == 404:
            return None
        if status != 200:
            raise OSError(f"GET {self.url}{path_suffix}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def healthy(self) -> bool:
        try:
            return self.get()[0] == 200
        except (OSError, ssl.SSLError, http.client.HTTPException):
            return False


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    log: Path,
    watch: Iterable[Started] = (),
) -> float:
    """Poll `ready` until it holds; returns the seconds waited.

    Raises NotReady after `timeout` s, or as soon as one of the `watch` programs (started by this
    invocation) exits, naming it and its log.
    """
    watch = tuple(watch)
    start = time.monotonic()
    while True:
        for started in watch:
            code = started.exited()
            if code is not None:
                raise NotReady(
                    f"{started.spec.name} exited with code {code} while waiting for {what}: "
                    f"see {started.log}"
                )
        if ready():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise NotReady(f"{what} not ready after {timeout:.0f} s: see {log}")
        time.sleep(POLL_S)


def node_ready(api: Probe, node_name: str) -> bool:
    """Whether the Node exists with condition Ready=True."""
    try:
        node = api.get_json(f"/api/v1/nodes/{node_name}")
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
        return False
    if not node:
        return False
    conditions = node.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
