"""The portable KV transport: block bytes streamed over ``KVService.ReadBlocks``.

The source sends the requested blocks concatenated and cut into chunks of up to
``max_chunk_bytes`` (4 MiB default; fewer, larger messages are what make Python gRPC fast); the
sink copies each chunk straight into its destination blocks, so nothing is staged whole. The
stream carries one deadline, so a source that dies mid-stream surfaces as UNAVAILABLE or
DEADLINE_EXCEEDED, never as a hang.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import numpy as np
import torch

from splitserve.kvtransfer.checksum import byte_view
from splitserve.kvtransfer.errors import (
    ChecksumMismatchError,
    PeerError,
    TransferTimeoutError,
)
from splitserve.kvtransfer.pool import KVPool
from splitserve.kvtransfer.status import error_of
from splitserve.kvtransfer.transport import KVBlockSink
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import PROTOCOL_VERSION

_DATA_TAG = b"\x12"  # field 2 (ReadBlocksResponse.data), wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class WireChunk:
    """A ``ReadBlocksResponse`` whose ``data`` is still a list of views into the pool.

    ``serialize`` writes the protobuf wire format with ONE copy of the block bytes (the header
    fields, then field 2 as a length-delimited run built by ``bytes.join``), instead of the
    three copies of gather + assign + ``SerializeToString``. Protobuf parsers accept fields in
    any order, so readers decode it as an ordinary ``ReadBlocksResponse``.
    """

    __slots__ = ("header", "nbytes", "parts")

    def __init__(self, header: pb.ReadBlocksResponse, parts: list, nbytes: int) -> None:
        self.header, self.parts, self.nbytes = header, parts, nbytes

    def serialize(self) -> bytes:
        prefix = self.header.SerializeToString() + _DATA_TAG + _varint(self.nbytes)
        return b"".join([prefix, *self.parts])

    def to_message(self) -> pb.ReadBlocksResponse:
        return pb.ReadBlocksResponse.FromString(self.serialize())


def serialize_read_response(message: WireChunk | pb.ReadBlocksResponse) -> bytes:
    """The ``ReadBlocks`` response serializer of ``KVServicer``."""
    if isinstance(message, WireChunk):
        return message.serialize()
    return message.SerializeToString()


class GrpcBlockSink(KVBlockSink):
    """Pulls blocks with the ``ReadBlocks`` server stream."""

    transport = "grpc"

    def __init__(self, pool: KVPool, max_chunk_bytes: int = 4 << 20) -> None:
        super().__init__(pool)
        self.max_chunk_bytes = max_chunk_bytes
        # Non-CPU pools receive each chunk through a host tensor (the "staged" path).
        self._staged = not pool.is_cpu
        self._rows = (
            pool.blocks_u8()
            if self._staged
            else byte_view(pool.blocks_u8()).reshape(pool.num_blocks, -1)
        )

    def read(
        self,
        stub: pb_grpc.KVServiceStub,
        handoff: pb.KVHandoff,
        endpoint: pb.TransportEndpoints,
        dst_block_ids: Sequence[int],
        deadline: float,
    ) -> None:
        request = pb.ReadBlocksRequest(
            lease=pb.LeaseRef(
                lease_id=handoff.lease_id, engine_id=handoff.engine_id, epoch=handoff.epoch
            ),
            compat_hash=handoff.compat_hash,
            block_ids=handoff.block_ids,
            max_chunk_bytes=self.max_chunk_bytes,
            protocol_version=PROTOCOL_VERSION,
        )
        bn = self.pool.block_nbytes
        total = bn * len(dst_block_ids)
        received = 0
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeoutError("ReadBlocks: deadline passed before the read started")
        call = stub.ReadBlocks(request, timeout=remaining)
        try:
            for message in call:
                if received == 0:
                    self._check_header(message, handoff, total)
                if message.offset != received:
                    raise PeerError(f"ReadBlocks: chunk at {message.offset}, expected {received}")
                self._scatter(message.data, received, dst_block_ids)
                received += len(message.data)
                if received > total:
                    raise PeerError(f"ReadBlocks: {received} bytes sent, expected {total}")
        except grpc.RpcError as error:
            raise error_of(error, "ReadBlocks") from None
        finally:
            call.cancel()  # no-op when the stream completed; stops the source otherwise
        if received != total:
            raise PeerError(f"ReadBlocks: stream ended after {received} of {total} bytes")

    def _check_header(self, message: pb.ReadBlocksResponse, handoff: pb.KVHandoff, total: int):
        if message.block_nbytes != self.pool.block_nbytes or message.total_bytes != total:
            raise PeerError(
                f"ReadBlocks: source block size {message.block_nbytes} B / total "
                f"{message.total_bytes} B, expected {self.pool.block_nbytes} B / {total} B"
            )
        if list(message.block_checksums) != list(handoff.block_checksums):
            raise ChecksumMismatchError(
                f"the source's blocks for request {handoff.request_id!r} changed since the "
                "hand-off was issued"
            )

    def _scatter(self, data: bytes, offset: int, dst_block_ids: Sequence[int]) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        if self._staged:
            src = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._rows.device)
        bn = self.pool.block_nbytes
        pos = 0
        while pos < len(src):
            j, within = divmod(offset + pos, bn)
            take = min(bn - within, len(src) - pos)
            self._rows[dst_block_ids[j], within : within + take] = src[pos : pos + take]
            pos += take
