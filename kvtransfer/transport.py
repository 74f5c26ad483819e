"""The contract both KV transports implement on the reading (decode) side.

A sink moves the bytes of a hand-off's blocks into the local pool at ``dst_block_ids`` and
verifies every block against the checksum taken at the source. It either returns a
``TransferResult`` or raises a ``KVTransferError`` subclass, and never waits past ``deadline``
(``time.monotonic()`` seconds): a dead peer costs at most the deadline, never a hang. After a
failure the destination blocks hold undefined bytes and must not be used.

The serving side needs no per-transport code beyond ``KVBlockSource`` (gRPC reads) and a NIXL
registration of its pool (NIXL reads are one-sided).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.kvtransfer.checksum import mismatched
from splitserve.kvtransfer.errors import ChecksumMismatchError
from splitserve.kvtransfer.pool import KVPool
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class TransferResult:
    """What one successful pull moved."""

    transport: str
    num_blocks: int
    num_bytes: int
    seconds: float  # handshake excluded, checksum verification included

    @property
    def gbps(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class KVBlockSink(abc.ABC):
    """Reads a hand-off's blocks into the local pool (one instance per pool and transport)."""

    transport: str

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    @abc.abstractmethod
    def read(
        self,
        stub: pb_grpc.KVServiceStub,
        handoff: pb.KVHandoff,
        endpoint: pb.TransportEndpoints,
        dst_block_ids: Sequence[int],
        deadline: float,
    ) -> None:
        """Copy the blocks into ``dst_block_ids``; raise ``KVTransferError`` on any failure.

        ``stub`` reaches the source's KVService (lease checks, gRPC streaming); ``endpoint`` is
        the source's handshake answer (NIXL agent metadata lives there).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release transport resources."""

    def verify(self, handoff: pb.KVHandoff, dst_block_ids: Sequence[int]) -> None:
        """Raise ``ChecksumMismatchError`` unless each destination block hashes as at the source."""
        bad = mismatched(self.pool.kv_cache, dst_block_ids, handoff.block_checksums)
        if bad:
            raise ChecksumMismatchError(
                f"{len(bad)} of {len(dst_block_ids)} blocks of request {handoff.request_id!r} "
                f"failed checksum verification (hand-off positions {bad[:8]})",
                block_indices=tuple(bad),
            )
