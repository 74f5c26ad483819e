"""KV-block transfer between engines: hand-offs under leases, checksums, compatibility checks,
and two transports (NIXL one-sided reads, gRPC streaming) behind one interface.

Serving side (prefill): ``KVBlockSource`` + ``KVServicer``. Reading side (decode): ``KVPuller``.
See docs/protocol.md.
"""

from splitserve.services.kvtransfer.compat import (
    PROTOCOL_VERSION,
    CompatInfo,
    check_compatible,
    compat_hash,
)
from splitserve.services.kvtransfer.errors import (
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
from splitserve.services.kvtransfer.leases import Lease, LeaseTable
from splitserve.services.kvtransfer.metrics import TransferMetrics
from splitserve.services.kvtransfer.nixl_transport import nixl_available
from splitserve.services.kvtransfer.pool import KVPool, allocate_kv_pool
from splitserve.services.kvtransfer.puller import KVPuller
from splitserve.services.kvtransfer.servicer import GRPC_OPTIONS, KVServicer
from splitserve.services.kvtransfer.source import KVBlockSource, SourceConfig
from splitserve.services.kvtransfer.transport import TransferResult

__all__ = [
    "GRPC_OPTIONS",
    "PROTOCOL_VERSION",
    "ChecksumMismatchError",
    "CompatInfo",
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
    "compat_hash",
    "nixl_available",
]
