"""Log lines every server writes the same way: text or JSON lines, each with the request id (when
the line belongs to a request), the pod role and the engine id.

The request id is one per client request: the router takes it from ``X-Request-Id`` or makes one,
returns it to the client, and sends it to the pods as gRPC metadata (``REQUEST_ID_KEY``), where
the handlers bind it for the lines they log. ``RequestLog`` also carries what the router's access
log reports at the end (token counts), filled in by whoever knows them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_KEY = "x-request-id"  # HTTP header and gRPC metadata key
LOG_FORMATS = ("text", "json")
# What a client may send as its request id: printable, no spaces, bounded (else we make one).
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass
class RequestLog:
    """One request's facts for its log lines, shared by everything that runs it."""

    request_id: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


_CURRENT: ContextVar[RequestLog | None] = ContextVar("splitserve_request", default=None)


def current() -> RequestLog | None:
    return _CURRENT.get()


def request_id() -> str | None:
    rec = _CURRENT.get()
    return rec.request_id if rec is not None else None


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def accept_request_id(value: str | None) -> str:
    """The client's id if it is one we can log and echo, else a new one."""
    if value and _CLIENT_ID.fullmatch(value):
        return value
    return new_request_id()


@contextlib.contextmanager
def bound(rec: RequestLog) -> Iterator[RequestLog]:
    """Lines logged inside (and in tasks started inside) carry ``rec.request_id``."""
    token = _CURRENT.set(rec)
    try:
        yield rec
    finally:
        _CURRENT.reset(token)


def bind_from_metadata(metadata) -> RequestLog | None:
    """Bind the request id a gRPC call carries (``invocation_metadata()``), if any, for the
    rest of the handler's task; the record, or None."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            rec = RequestLog(value[:128])
            _CURRENT.set(rec)  # the handler's own task: gone with it
            return rec
    return None


class _Identity(logging.Filter):
    """Stamps every record with the request id, role and engine id."""

    def __init__(self, role: str, engine_id: str | None) -> None:
        super().__init__()
        self.role = role
        self.engine_id = engine_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id()
        record.role = self.role
        record.engine_id = self.engine_id
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [{rid}]" if rid else line


def setup_logging(level: str, fmt: str, role: str, engine_id: str | None = None) -> None:
    """Configure the root logger of this process (uvicorn's and grpc's loggers propagate to it).

    ``fmt="json"``: one JSON object per line with ``timestamp``, ``level``, ``logger``,
    ``message``, ``request_id``, ``role``, ``engine_id`` and any ``extra`` fields.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Identity(role, engine_id))
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}{request_id}{role}{engine_id}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp=True,  # ISO 8601, UTC
            )
        )
    else:
        handler.setFormatter(_Text("%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become records in the same format
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


def set_engine_id(engine_id: str) -> None:
    """Stamp lines with the engine id once it is known (after the engine started)."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, _Identity):
                f.engine_id = engine_id
