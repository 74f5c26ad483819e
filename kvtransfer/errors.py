"""Typed failures of a KV-block transfer.

Every failure a decode pod can meet while pulling blocks is one ``KVTransferError`` subclass with a
short, stable ``reason`` (used as the ``reason`` label of the failure metric and reported to the
client), so the caller can apply ``--kv-failure-policy`` (recompute or fail) without parsing text.
"""

from __future__ import annotations


class KVTransferError(Exception):
    """A KV-block transfer failed; the blocks at the destination must not be used."""

    reason = "error"


class PeerUnreachableError(KVTransferError):
    """The serving side could not be reached (down, restarting, wrong address)."""

    reason = "unreachable"


class TransferTimeoutError(KVTransferError):
    """The transfer did not finish before its deadline."""

    reason = "timeout"


class EpochMismatchError(KVTransferError):
    """The hand-off names an engine incarnation that is not the one serving now (a restart)."""

    reason = "epoch_mismatch"


class LeaseExpiredError(KVTransferError):
    """The lease is unknown to the serving side: expired, released, or never granted."""

    reason = "lease_expired"


class ChecksumMismatchError(KVTransferError):
    """A block's bytes at the destination do not match the checksum taken at the source."""

    reason = "checksum_mismatch"

    def __init__(self, message: str, block_indices: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.block_indices = block_indices  # positions (in the hand-off) of the bad blocks


class IncompatiblePeerError(KVTransferError):
    """The two engines disagree on a fact that gives block bytes their meaning."""

    reason = "incompatible"

    def __init__(self, message: str, differences: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.differences = differences  # names of the fields that differ


class TransportUnavailableError(KVTransferError):
    """No transport both sides support (e.g. NIXL requested but not installed)."""

    reason = "transport_unavailable"


class InvalidHandoffError(KVTransferError):
    """The hand-off or request is malformed (wrong block count, bad ids, ...)."""

    reason = "invalid_handoff"


class PeerError(KVTransferError):
    """The serving side failed in a way not covered above (its gRPC status is in the message)."""

    reason = "peer_error"
