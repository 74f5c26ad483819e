"""The router's HTTP server: uvicorn, with its own refusals in the OpenAI error shape.

uvicorn answers what it cannot parse (a garbled request line, a ``Content-Length`` shorter than
the body, so the rest reads as a broken next request) itself, with a plain-text 400, before any
ASGI code runs. The protocol classes here keep uvicorn's parsing but:

- answer those 400s as OpenAI JSON (``invalid_http_request``);
- stop reading a request whose URL passes ``max_url_bytes`` (414) or whose headers pass
  ``max_header_bytes`` / ``max_headers`` (431), as the parser delivers them, so the memory a
  client can make the router hold for its request head is bounded by the limits. The ASGI guard
  checks the same limits again (``guard.py``) for servers that run the app another way.

What stays out of reach: TLS and TCP-level failures (uvicorn closes the connection), and
HTTP/1.0 quirks handled inside ``httptools``; those never carry a body to shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from splitserve.services.router.errors import APIError, render_error
from splitserve.services.router.guard import Limits

log = logging.getLogger(__name__)

try:  # the default (httptools is a dependency); h11 below otherwise
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools missing
    httptools = None
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

_REASONS = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _LimitExceeded(Exception):
    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def _raw_response(status: int, body: bytes, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))]
    for name, value in default_headers:
        head.append(name + b": " + value + b"\r\n")
    head.append(b"content-type: application/json\r\n")
    head.append(b"content-length: %d\r\n" % len(body))
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


def _bad_http(msg: str) -> APIError:
    return APIError(400, f"malformed HTTP request: {msg}", code="invalid_http_request")


def protocol_class(limits: Limits) -> type[Any]:
    """uvicorn's httptools protocol with the limits and JSON refusals (h11's without httptools)."""
    if HttpToolsProtocol is None:  # pragma: no cover
        return _json_h11()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        _url_bytes = 0
        _header_bytes = 0
        _header_count = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._url_bytes = self._header_bytes = self._header_count = 0

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > limits.max_path_bytes:
                raise _LimitExceeded(
                    APIError(414, f"URI longer than {limits.max_path_bytes} bytes",
                             code="uri_too_long")
                )  # fmt: skip
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            self._header_bytes += len(name) + len(value)
            if (
                self._header_bytes > limits.max_header_bytes
                or self._header_count > limits.max_headers
            ):
                raise _LimitExceeded(
                    APIError(
                        431,
                        f"request headers exceed {limits.max_headers} fields or "
                        f"{limits.max_header_bytes} bytes",
                        code="request_header_fields_too_large",
                    )
                )
            super().on_header(name, value)

        def data_received(self, data: bytes) -> None:
            try:
                super().data_received(data)
            except _LimitExceeded as exc:  # pragma: no cover - httptools wraps it (below)
                self._refuse(exc.error)

        def send_400_response(self, msg: str) -> None:
            # httptools reports a callback's exception as a parser error: find ours.
            cause = _limit_cause()
            self._refuse(cause or _bad_http(msg))

        def _refuse(self, error: APIError) -> None:
            if self.transport.is_closing():
                return
            default = list(self.server_state.default_headers)
            self.transport.write(_raw_response(error.status, render_error(error), default))
            self.transport.close()

    return GuardedHttpToolsProtocol


def _limit_cause() -> APIError | None:
    """The limit a parser callback raised, if that is why parsing failed: httptools raises its
    callback error with ours as the context, and uvicorn calls ``send_400_response`` from the
    ``except`` block that caught it."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, _LimitExceeded):
            return exc.error
        exc = exc.__context__
    return None


def _json_h11() -> type[Any]:
    class JsonH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = render_error(_bad_http(msg))
            default = list(self.server_state.default_headers)
            self.transport.write(_raw_response(400, body, default))
            self.transport.close()

    return JsonH11Protocol


def config(app: Any, host: str, port: int, limits: Limits, **kw: Any) -> uvicorn.Config:
    """The uvicorn configuration the router runs with."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits),
        h11_max_incomplete_event_size=limits.max_header_bytes + limits.max_path_bytes,
        log_level=kw.pop("log_level", "warning"),
        access_log=kw.pop("access_log", False),
        **kw,
    )


def serve(app: Any, host: str, port: int, limits: Limits, drain_seconds: float = 30.0) -> None:
    """Run the router until it is told to stop (SIGTERM / SIGINT).

    Stopping drains: uvicorn closes the listening socket at once (the pod is already out of
    its Service's endpoints, or leaving them), closes idle keep-alive connections, and lets
    requests in flight, streams included, run for up to ``drain_seconds`` before it cuts them.
    """
    cfg = config(app, host, port, limits, timeout_graceful_shutdown=drain_seconds or None)
    uvicorn.Server(cfg).run()
