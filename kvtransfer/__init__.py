"""KV-block transfer between engines: hand-offs under leases, checksums, compatibility checks,
and two transports (NIXL one-sided reads, gRPC streaming) behind one interface.

Serving side (prefill): ``KVBlockSource`` + ``KVServicer``. Reading side (decode): ``KVPuller``.
See docs/protocol.md.
"""

from splitserve.kvtransfer.compat import check_compatible
from splitserve.kvtransfer.errors import (
    ChecksumMismatchError,
    EpochMismatchError,
    IncompatiblePeerError,
    InvalidHandoffError,
    KVTransferError,
    LeaseExpiredError,
    PeerError,
    PeerUnreachableError,
    TransferTimeoutError,
    TransportUnavailableError,
)
from splitserve.kvtransfer.leases import Lease, LeaseTable
from splitserve.kvtransfer.metrics import TransferMetrics
from splitserve.kvtransfer.nixl_transport import nixl_available
from splitserve.kvtransfer.pool import KVPool, allocate_kv_pool
from splitserve.kvtransfer.puller import KVPuller
from splitserve.kvtransfer.servicer import KVServicer
from splitserve.kvtransfer.source import KVBlockSource, SourceConfig
from splitserve.kvtransfer.transport import TransferResult

__all__ = [
    "ChecksumMismatchError",
    "EpochMismatchError",
    "IncompatiblePeerError",
    "InvalidHandoffError",
    "KVBlockSource",
    "KVPool",
    "KVPuller",
    "KVServicer",
    "KVTransferError",
    "Lease",
    "LeaseExpiredError",
    "LeaseTable",
    "PeerError",
    "PeerUnreachableError",
    "SourceConfig",
    "TransferMetrics",
    "TransferResult",
    "TransferTimeoutError",
    "TransportUnavailableError",
    "allocate_kv_pool",
    "check_compatible",
    "nixl_available",
]
