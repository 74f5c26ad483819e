"""OpenAI-shaped errors: one exception type the handlers raise and one body every client parses.

Every non-2xx answer of the router carries ``{"error": {"message", "type", "param", "code"}}``
so the official SDK raises the matching ``openai.*Error`` with a readable message instead of a
JSON decode failure. ``render_error`` is the one place that turns an error into bytes (HTTP body
or SSE event), and it cannot fail: whatever a message echoes back from the client (a model
name, a field value) is cut to a bounded length and made encodable first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# HTTP status -> OpenAI error "type" (the SDK maps on the status; the type is for humans and logs).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "invalid_request_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}
# An error message echoes client input at most this long (a 1 MB model name is not sent back).
MAX_MESSAGE_CHARS = 1000
MAX_PARAM_CHARS = 200


def error_type(status: int) -> str:
    """The OpenAI ``type`` of an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass
class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI fields."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return error_type(self.status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def _clean(text: object, limit: int) -> str:
    """``text`` as a string that always encodes: lone surrogates escaped, length bounded."""
    try:
        s = text if isinstance(text, str) else str(text)
    except Exception:  # noqa: BLE001 - a __str__ that raises must not break the error path
        s = f"<unprintable {type(text).__name__}>"
    if len(s) > limit:
        s = s[:limit] + f"... ({len(s) - limit} more characters)"
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """The OpenAI error object, with every string safe to encode."""
    return {
        "error": {
            "message": _clean(message, MAX_MESSAGE_CHARS),
            "type": _clean(type_, 100),
            "param": None if param is None else _clean(param, MAX_PARAM_CHARS),
            "code": code if code is None or isinstance(code, int) else _clean(code, 100),
        }
    }


def render_error(err: APIError) -> bytes:
    """The JSON bytes of ``err``'s body. Never raises."""
    try:
        body = err.body()
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    except Exception:  # noqa: BLE001 - the fallback below is a constant
        return (
            b'{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}'
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(request_id: str) -> APIError:
    """The 500 for an unexpected exception: no detail leaks, the id finds the logged traceback."""
    return APIError(
        500,
        f"internal server error (request id {request_id}); the router logged the details",
        code="internal_error",
    )  # the guard puts X-Request-Id on every response


class NoBackendError(APIError):
    """No ready pod can take the request: 503 with Retry-After so clients back off and retry."""

    def __init__(self, message: str = "no ready backend pod", retry_after_s: int = 1) -> None:
        super().__init__(
            503, message, code="no_backend", headers={"Retry-After": str(retry_after_s)}
        )


class BackendError(Exception):
    """A pod failed a call.

    ``retryable``: another pod may succeed (the pod failed, not the input).
    """

    def __init__(
        self, message: str, *, retryable: bool, pod: str | None = None, http_status: int = 502
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.pod = pod
        self.http_status = http_status  # what the client sees when no retry is left
