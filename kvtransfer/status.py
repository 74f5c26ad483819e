"""One mapping between ``KVTransferError`` subclasses and gRPC status codes, both directions.

The server aborts with ``"<reason>: <message>"`` as details, so the client can rebuild the exact
error class (and the operator reads the same words in both pods' logs).
"""

from __future__ import annotations

import re

import grpc

from splitserve.kvtransfer import errors as e

_CODES: dict[type[e.KVTransferError], grpc.StatusCode] = {
    e.EpochMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    e.IncompatiblePeerError: grpc.StatusCode.FAILED_PRECONDITION,
    e.TransportUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    e.LeaseExpiredError: grpc.StatusCode.NOT_FOUND,
    e.InvalidHandoffError: grpc.StatusCode.INVALID_ARGUMENT,
    e.ChecksumMismatchError: grpc.StatusCode.DATA_LOSS,
    e.TransferTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.PeerUnreachableError: grpc.StatusCode.UNAVAILABLE,
}
_FIELD = re.compile(r"(\w+): \w+=")
_BY_REASON: dict[str, type[e.KVTransferError]] = {cls.reason: cls for cls in _CODES}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a server should abort with for ``error``."""
    if isinstance(error, e.KVTransferError):
        return _CODES.get(type(error), grpc.StatusCode.INTERNAL), f"{error.reason}: {error}"
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{e.InvalidHandoffError.reason}: {error}"
    return grpc.StatusCode.INTERNAL, f"{e.PeerError.reason}: {type(error).__name__}: {error}"


def error_of(rpc_error: grpc.RpcError, what: str) -> e.KVTransferError:
    """The ``KVTransferError`` a client should raise for a failed call ``what``."""
    code = rpc_error.code() if hasattr(rpc_error, "code") else None
    details = (rpc_error.details() if hasattr(rpc_error, "details") else "") or ""
    reason, _, message = details.partition(": ")
    cls = _BY_REASON.get(reason)
    if cls is e.IncompatiblePeerError:  # keep the names of the differing fields
        return cls(f"{what}: {message}", differences=tuple(_FIELD.findall(message)))
    if cls is not None:
        return cls(f"{what}: {message}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return e.PeerUnreachableError(f"{what}: peer unavailable ({details})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return e.TransferTimeoutError(f"{what}: deadline exceeded")
    if code == grpc.StatusCode.CANCELLED:
        return e.PeerUnreachableError(f"{what}: cancelled ({details})")
    return e.PeerError(f"{what}: {code.name if code else 'error'}: {details}")
