"""The router's outer ASGI layer: limits, auth, bodies, request ids, metrics and the catch-all.

In order, for every HTTP request:

1. a request id: the client's ``X-Request-Id`` when it sent a usable one, else a new one; on
   every response (``X-Request-Id``), in the 500 body, on every log line about the request, and
   sent on to the pods (``splitserve.observability``); with tracing on, the request's server
   span (the client's ``traceparent`` honoured);
2. path and header sizes (414 / 431; the HTTP server refuses far bigger ones itself, see
   ``http_server.py``);
3. the API key, except on the open paths (401);
4. for the JSON endpoints: the declared ``Content-Length`` (413 at once), the content type (415),
   then the body itself, read under the limit: 413 as soon as one byte too many arrived, chunked
   or not, so the router never holds more than the limit of one body;
5. the app, inside a catch-all: an exception nobody handled becomes an OpenAI-shaped 500 with the
   request id (its traceback logged), never Starlette's plain-text one;
6. metrics labelled by route template from a closed set (unknown paths are ``other``), so no
   client can add series;
7. one access-log line per request (logger ``splitserve.access``, INFO): method, route, status,
   latency and, for generation, the token counts.

Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides client
disconnects from the handlers (which must abort on the pods) and costs latency per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitserve.observability import logs, tracing
from splitserve.services.router.auth import ApiKeys
from splitserve.services.router.body import (
    BodyTooLarge,
    ClientGone,
    check_content_type,
    read_body,
    too_large,
)
from splitserve.services.router.errors import APIError, internal_error, render_error
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.workers import trim_heap

log = logging.getLogger(__name__)
access_log = logging.getLogger("splitserve.access")

# Paths that need no API key (probes and scrapes; vLLM leaves the same ones open).
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version", "/openapi.json"})
OTHER = "other"  # the metrics label of every path that is no route
TRIM_AFTER_BYTES = 1 << 20  # a body this big: hand freed heap back to the OS afterwards


@dataclass(frozen=True)
class Limits:
    """What one request may send (bytes)."""

    max_body_bytes: int = 8 << 20
    max_path_bytes: int = 8 << 10  # the path and query string
    max_header_bytes: int = 64 << 10  # all header names and values together
    max_headers: int = 100


@dataclass(frozen=True)
class Routes:
    """The closed set of metric labels: route templates, and which take a JSON body."""

    exact: frozenset[str]
    prefixes: tuple[tuple[str, str], ...] = ()  # (path prefix, template) for path parameters
    json_bodies: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_paths(cls, paths: Iterable[str], json_bodies: Iterable[str]) -> Routes:
        exact, prefixes = set(), []
        for path in paths:
            if "{" in path:
                prefixes.append((path[: path.index("{")], path.replace(":path}", "}")))
            else:
                exact.add(path)
        return cls(frozenset(exact), tuple(prefixes), frozenset(json_bodies))

    def label(self, path: str) -> str:
        if path in self.exact:
            return path
        for prefix, template in self.prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                return template
        return OTHER


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: ApiKeys,
        limits: Limits,
        metrics: RouterMetrics,
        routes: Routes,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.limits = limits
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        client_id = _header(headers, logs.REQUEST_ID_KEY.encode(), None)
        rid = logs.accept_request_id(None if client_id is None else client_id.decode("latin-1"))
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["arrival"] = t0  # the app's queue-time histogram starts here
        status = [0]
        rid_header = (logs.REQUEST_ID_KEY.encode(), rid.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path: str = scope["path"]
        label = self.routes.label(path)
        method = scope.get("method", "")
        size = 0
        with (
            logs.bound(logs.RequestLog(rid)) as rec,
            tracing.http_server_span(
                f"{method} {label}", headers, {"http.request.method": method, "http.route": label}
            ) as span,
        ):
            try:
                error, body = await self._admit(scope, receive)
                if body is not None:
                    size = len(body)
                    receive = _replay(body, receive)
                if error is not None:
                    await _send_error(send_wrapper, error)
                else:
                    await self.app(scope, receive, send_wrapper)
            except ClientGone:
                status[0] = status[0] or 499  # nothing to answer: the client left mid-body
            except Exception:  # noqa: BLE001 - the catch-all: no plain-text 500 leaves the router
                log.exception("request %s %s %s failed", rid, method, path[:200])
                if status[0] == 0:
                    await _send_error(send_wrapper, internal_error(rid))
                else:
                    status[0] = 500  # the response had started: the stream ends as it is
            finally:
                seconds = time.perf_counter() - t0
                code = status[0] or 500
                self.metrics.requests.labels(label, str(code)).inc()
                self.metrics.latency.labels(label).observe(seconds)
                tracing.set_attributes(span, {"http.response.status_code": code})
                if code >= 500:
                    tracing.set_error(span, f"HTTP {code}")
                if label not in OPEN_PATHS:  # probes and scrapes would drown the rest
                    _log_access(method, label, code, seconds, rec)
                if size > TRIM_AFTER_BYTES:
                    asyncio.get_running_loop().run_in_executor(None, trim_heap)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[APIError | None, bytes | None]:
        """The error that refuses this request before the app, and the body read (JSON routes)."""
        limits = self.limits
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
        if len(raw_path) + len(scope.get("query_string", b"")) > limits.max_path_bytes:
            return APIError(414, f"URI longer than {limits.max_path_bytes} bytes",
                            code="uri_too_long"), None  # fmt: skip
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if (
            len(headers) > limits.max_headers
            or sum(len(k) + len(v) for k, v in headers) > limits.max_header_bytes
        ):
            return APIError(
                431,
                f"request headers exceed {limits.max_headers} fields or "
                f"{limits.max_header_bytes} bytes",
                code="request_header_fields_too_large",
            ), None
        path: str = scope["path"]
        if path not in OPEN_PATHS and self.api_keys.enabled:
            auth = _header(headers, b"authorization")
            if not self.api_keys.check(auth.decode("latin-1")):
                return APIError(401, "invalid or missing API key", code="invalid_api_key"), None
        if scope["method"] != "POST" or path not in self.routes.json_bodies:
            return None, None
        length = _header(headers, b"content-length")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            return too_large(limits.max_body_bytes), None
        ctype = _header(headers, b"content-type", None)
        try:
            check_content_type(None if ctype is None else ctype.decode("latin-1"))
        except APIError as err:
            return err, None
        try:
            return None, await read_body(receive, limits.max_body_bytes)
        except BodyTooLarge:
            err = too_large(limits.max_body_bytes)
            err.headers["Connection"] = "close"  # the rest of the body is never read
            return err, None


def _log_access(method: str, route: str, status: int, seconds: float, rec: logs.RequestLog):
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields = {"method": method, "route": route, "status": status,
              "latency_ms": round(seconds * 1e3, 2)}  # fmt: skip
    tokens = ""
    if rec.prompt_tokens is not None:
        fields["prompt_tokens"] = rec.prompt_tokens
        fields["completion_tokens"] = rec.completion_tokens
        tokens = f" tokens={rec.prompt_tokens}+{rec.completion_tokens}"
    access_log.info("%s %s %d %.1fms%s", method, route, status, seconds * 1e3, tokens, extra=fields)


def _header(headers: list[tuple[bytes, bytes]], name: bytes, default=b"") -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v
    return default


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real messages (a
    disconnect, which the handlers watch for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, err: APIError) -> None:
    """Send ``err`` as a whole response (the only error path that writes raw ASGI)."""
    body = render_error(err)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in err.headers.items():
        headers.append((k.lower().encode("latin-1"), v.encode("latin-1", "replace")))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
