"""OpenAI-shaped errors: one exception type the handlers raise and one body every client parses.

Every non-2xx answer of the router carries ``{"error": {"message", "type", "param", "code"}}``
so the official SDK raises the matching ``openai.*Error`` with a readable message instead of a
JSON decode failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HTTP status -> OpenAI error "type" (the SDK maps on the status; the type is for humans and logs).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
}


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
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


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
