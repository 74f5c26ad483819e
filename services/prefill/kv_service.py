"""KVService on the prefill server's asyncio gRPC server, over the thread-safe KVBlockSource.

The blocking parts (checksums, copying block bytes into messages) run in worker threads so the
event loop keeps serving Prefill calls and health checks during large reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.services.kvtransfer.source import KVBlockSource
from splitserve.services.kvtransfer.status import status_of

_DONE = object()


class AsyncKVServicer(pb_grpc.KVServiceServicer):
    def __init__(self, source: KVBlockSource) -> None:
        self.source = source

    async def Handshake(self, request, context) -> pb.HandshakeResponse:
        try:
            return self.source.handshake(request)
        except Exception as error:  # noqa: BLE001 - every refusal becomes a status with details
            await context.abort(*status_of(error))

    async def ReadBlocks(self, request, context) -> AsyncIterator[pb.ReadBlocksResponse]:
        try:
            chunks = await asyncio.to_thread(self.source.read_blocks, request)
        except Exception as error:  # noqa: BLE001
            await context.abort(*status_of(error))
        while True:
            # Each chunk copies up to a few MiB: keep that off the event loop.
            message = await asyncio.to_thread(next, chunks, _DONE)
            if message is _DONE:
                return
            yield message

    async def Release(self, request, context) -> pb.ReleaseResponse:
        try:
            n = self.source.release(request.lease.lease_id, request.lease.epoch)
        except Exception as error:  # noqa: BLE001
            await context.abort(*status_of(error))
        return pb.ReleaseResponse(released=n > 0, num_blocks=n)

    async def ExtendLease(self, request, context) -> pb.ExtendLeaseResponse:
        try:
            ttl = request.ttl_ms / 1000 if request.ttl_ms else None
            lease = self.source.extend(request.lease.lease_id, request.lease.epoch, ttl)
        except Exception as error:  # noqa: BLE001
            await context.abort(*status_of(error))
        return pb.ExtendLeaseResponse(lease_expiry_unix_ms=lease.expiry_unix_ms)
