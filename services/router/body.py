"""Request bodies: read under a byte limit, content type checked, JSON parsed with bounds.

- ``read_body`` pulls ``http.request`` messages and stops at the first byte past the limit
  (chunked or not), so a client can never make the router hold more than the limit.
- ``check_content_type``: a body must be JSON (``application/json`` or ``*/*+json``, any
  parameters); a request without a ``Content-Type`` is read as JSON, as FastAPI does.
- ``parse_json``: strict JSON (no NaN / Infinity literals) by pydantic's Rust parser, which
  refuses invalid UTF-8, lone UTF-16 surrogates (``"\\ud800"``) and nesting deeper than
  ``MAX_JSON_DEPTH`` as it reads, without recursing in Python.
- ``validate``: a pydantic model, its errors as one 400 naming the field.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from starlette.types import Receive

from splitserve.services.router.errors import APIError

M = TypeVar("M", bound=BaseModel)

# The parser's own bound (jiter's recursion limit): deeper documents are refused while reading.
MAX_JSON_DEPTH = 200


# Fields that map client-chosen keys to values: an error names the field as `param` (as OpenAI
# does) and the key in its message.
_MAP_FIELDS = frozenset({"logit_bias"})


class BodyTooLarge(Exception):
    """More than the limit arrived."""


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, or ``BodyTooLarge`` as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def check_content_type(value: str | None) -> None:
    """415 unless the body is declared JSON (or not declared at all)."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise APIError(
        415,
        f"unsupported Content-Type {value[:100]!r}: send JSON (application/json)",
        code="unsupported_media_type",
    )


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; a 400 naming what is wrong otherwise."""
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False, cache_strings=False)
    except ValueError as err:
        text = str(err)
        if "recursion limit" in text:
            text = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        raise APIError(400, f"invalid JSON body: {text}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def validate(model: type[M], data: dict[str, Any], context: dict[str, Any] | None = None) -> M:
    """``model`` from parsed JSON; its validation errors as one 400 naming the first field."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise validation_error(err) from None


def validation_error(err: ValidationError) -> APIError:
    """A 400 whose ``param`` is the first failing field (``a.0.b``) and whose message names up
    to five, without pydantic's per-union-member noise."""
    errors = err.errors(include_url=False, include_input=False)
    seen: list[tuple[str, str]] = []
    for e in errors:
        loc = ".".join(str(x) for x in _plain_loc(e.get("loc", ())))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if (loc, msg) not in seen and all(loc != s[0] for s in seen):
            seen.append((loc, msg))
    param = seen[0][0] if seen else None
    if param and param.split(".", 1)[0] in _MAP_FIELDS:
        param = param.split(".", 1)[0]  # a map's field is the param; the message names the key
    message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in seen[:5])
    return APIError(400, message or "invalid request", param=param or None, code="invalid_value")


def _plain_loc(loc: tuple[Any, ...]) -> list[Any]:
    """A location without pydantic's union-member tags (``str``, ``list[TextPart]``, ...), so
    ``param`` is the field the client wrote."""
    out = []
    for part in loc:
        if (
            isinstance(part, str)
            and (
                part in {"str", "int", "float", "bool", "none", "dict", "list"}
                or "[" in part
                or ":" in part  # discriminator tags (protocol.PromptInput)
                or part.startswith(("function-", "constrained-", "is-instance", "lax-", "strict-"))
                or part[:1].isupper()
            )
        ):
            continue
        out.append(part)
    return out
