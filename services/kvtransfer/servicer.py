"""``KVService`` over gRPC: the prefill server mounts this on its ``grpc.server``.

Every refusal is a gRPC status with ``"<reason>: <message>"`` details (see ``status.py``):
FAILED_PRECONDITION for epoch / compatibility / transport mismatches, NOT_FOUND for an unknown or
expired lease, INVALID_ARGUMENT for a malformed request.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.services.kvtransfer.source import KVBlockSource
from splitserve.services.kvtransfer.status import status_of

# Pass these to grpc.server(...) and to channels that carry KV blocks: chunks are up to 64 MiB.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", 80 << 20),
    ("grpc.max_receive_message_length", 80 << 20),
]


class KVServicer(pb_grpc.KVServiceServicer):
    """Handshake / ReadBlocks / Release / ExtendLease over one ``KVBlockSource``."""

    def __init__(self, source: KVBlockSource) -> None:
        self.source = source

    def add_to_server(self, server: grpc.Server) -> None:
        pb_grpc.add_KVServiceServicer_to_server(self, server)

    def Handshake(self, request: pb.HandshakeRequest, context) -> pb.HandshakeResponse:
        try:
            return self.source.handshake(request)
        except Exception as error:
            context.abort(*status_of(error))

    def ReadBlocks(self, request: pb.ReadBlocksRequest, context) -> Iterator[pb.ReadBlocksResponse]:
        try:
            chunks = self.source.read_blocks(request)
        except Exception as error:
            context.abort(*status_of(error))
        for message in chunks:
            if not context.is_active():  # the reader gave up: stop copying
                return
            yield message

    def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        try:
            n = self.source.release(request.lease.lease_id, request.lease.epoch)
        except Exception as error:
            context.abort(*status_of(error))
        return pb.ReleaseResponse(released=n > 0, num_blocks=n)

    def ExtendLease(self, request: pb.ExtendLeaseRequest, context) -> pb.ExtendLeaseResponse:
        try:
            ttl = request.ttl_ms / 1000 if request.ttl_ms else None
            lease = self.source.extend(request.lease.lease_id, request.lease.epoch, ttl)
        except Exception as error:
            context.abort(*status_of(error))
        return pb.ExtendLeaseResponse(lease_expiry_unix_ms=lease.expiry_unix_ms)
