"""``KVService`` over gRPC: the prefill server mounts this on its ``grpc.server``.

Every refusal is a gRPC status with ``"<reason>: <message>"`` details (see ``status.py``):
FAILED_PRECONDITION for epoch / compatibility / transport mismatches, NOT_FOUND for an unknown or
expired lease, INVALID_ARGUMENT for a malformed request.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from splitserve.kvtransfer.grpc_transport import WireChunk, serialize_read_response
from splitserve.kvtransfer.source import KVBlockSource
from splitserve.kvtransfer.status import status_of
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc


class KVServicer(pb_grpc.KVServiceServicer):
    """Handshake / ReadBlocks / Release / ExtendLease over one ``KVBlockSource``."""

    def __init__(self, source: KVBlockSource) -> None:
        self.source = source

    def add_to_server(self, server: grpc.Server) -> None:
        """Mount on ``server``; like the generated ``add_KVServiceServicer_to_server`` except
        that ReadBlocks serializes ``WireChunk``s without extra copies."""
        unary = grpc.unary_unary_rpc_method_handler
        handlers = {
            "Handshake": unary(
                self.Handshake,
                request_deserializer=pb.HandshakeRequest.FromString,
                response_serializer=pb.HandshakeResponse.SerializeToString,
            ),
            "ReadBlocks": grpc.unary_stream_rpc_method_handler(
                self.ReadBlocks,
                request_deserializer=pb.ReadBlocksRequest.FromString,
                response_serializer=serialize_read_response,
            ),
            "Release": unary(
                self.Release,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseResponse.SerializeToString,
            ),
            "ExtendLease": unary(
                self.ExtendLease,
                request_deserializer=pb.ExtendLeaseRequest.FromString,
                response_serializer=pb.ExtendLeaseResponse.SerializeToString,
            ),
        }
        service = pb.DESCRIPTOR.services_by_name["KVService"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    def Handshake(self, request: pb.HandshakeRequest, context) -> pb.HandshakeResponse:
        try:
            return self.source.handshake(request)
        except Exception as error:
            context.abort(*status_of(error))

    def ReadBlocks(self, request: pb.ReadBlocksRequest, context) -> Iterator[WireChunk]:
        try:
            chunks = self.source.read_blocks(request)
        except Exception as error:
            context.abort(*status_of(error))
        # grpc.aio's context for sync handlers has no is_active(); gRPC stops pulling from the
        # generator itself once the call is cancelled, this only stops it a chunk earlier.
        is_active = getattr(context, "is_active", lambda: True)
        for message in chunks:
            if not is_active():  # the reader gave up: stop copying
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
