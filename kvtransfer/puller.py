"""The reading side's one entry point: pull a hand-off's KV blocks into the local pool.

``KVPuller.pull`` does, in order: check the hand-off against the local pool (protocol, compat hash,
layout, block counts) before touching the network; handshake with the source once per address and
incarnation (compatibility is checked there, with every differing field named); refuse a hand-off
whose epoch is not the source's current one; move the bytes with the best transport both sides
offer; verify every block's checksum; release the lease (asynchronously, off the critical path).
Every step that the caller waits for runs under one deadline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence

import grpc
import torch

from splitserve.kvtransfer.errors import (
    EpochMismatchError,
    IncompatiblePeerError,
    InvalidHandoffError,
    KVTransferError,
    LeaseExpiredError,
    PeerError,
    TransferTimeoutError,
    TransportUnavailableError,
)
from splitserve.kvtransfer.grpc_transport import GrpcBlockSink
from splitserve.kvtransfer.metrics import TransferMetrics
from splitserve.kvtransfer.pool import KVPool, layout_matches
from splitserve.kvtransfer.source import TRANSPORTS
from splitserve.kvtransfer.status import error_of
from splitserve.kvtransfer.transport import KVBlockSink, TransferResult
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import GRPC_CHANNEL_OPTIONS, PROTOCOL_VERSION
from splitserve.protocol.kv_compat import CompatInfo, kv_compat_hash

# Each channel its own subchannels: by default gRPC shares them between channels to the same
# address, so the fresh channel `handshake` makes for a restarted source would inherit the dead
# one's subchannel, still in reconnect backoff, and fail at once with "connection refused"
# (C-core subchannel sharing: grpc/grpc#21240).
_CHANNEL_OPTIONS = [*GRPC_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]

log = logging.getLogger(__name__)


class KVPuller:
    """Pulls KV blocks for one local pool from any number of sources. Thread-safe."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        compat: CompatInfo,
        engine_id: str,
        transports: Sequence[str] = TRANSPORTS,
        metrics: TransferMetrics | None = None,
        grpc_chunk_bytes: int = 4 << 20,
    ) -> None:
        self.pool = KVPool(kv_cache)
        self.compat = compat
        self.compat_hash = kv_compat_hash(compat)
        self.engine_id = engine_id
        self.metrics = metrics or TransferMetrics()
        if not transports or set(transports) - set(TRANSPORTS):
            raise ValueError(f"transports must be a non-empty subset of {TRANSPORTS}")
        self.transports = tuple(transports)
        self._sinks: dict[str, KVBlockSink] = {"grpc": GrpcBlockSink(self.pool, grpc_chunk_bytes)}
        if "nixl" in self.transports:
            from splitserve.kvtransfer.nixl_transport import NixlBlockSink

            self._sinks["nixl"] = NixlBlockSink(self.pool, agent_name=f"{engine_id}-reader")
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._handshakes: dict[str, pb.HandshakeResponse] = {}
        self._pending: set = set()  # in-flight asynchronous Release calls

    # -- public ----------------------------------------------------------------------------
    def pull(
        self,
        handoff: pb.KVHandoff,
        dst_block_ids: Sequence[int],
        timeout: float = 10.0,
        release: bool = True,
    ) -> TransferResult:
        """Copy the hand-off's blocks into ``dst_block_ids`` (same order) and verify them.

        Raises a ``KVTransferError`` subclass on any failure, within ``timeout`` seconds. With
        ``release`` the source's lease is released afterwards, on success and on failure alike,
        asynchronously (``flush`` waits for it; an unreachable source lets the lease expire).
        """
        deadline = time.monotonic() + timeout
        transport = "none"
        try:
            self._check_handoff(handoff, dst_block_ids)
            address = handoff.endpoints.grpc_address
            hs = self._handshake_for(handoff, deadline)
            transport = self._choose(hs)
            stub = self._stub(address)
            lease_check = None
            if transport != "grpc":
                # A one-sided read cannot be refused by the source, so the lease is checked (and
                # extended) by an RPC that runs alongside the read. Its answer is awaited either
                # way: a lease the source no longer honours fails the pull even if the bytes
                # happened to be intact, and it names the cause when they were not.
                lease_check = stub.ExtendLease.future(
                    pb.ExtendLeaseRequest(lease=_lease_ref(handoff)),
                    timeout=self._remaining(deadline, "ExtendLease"),
                )
            start = time.monotonic()
            sink = self._sinks[transport]
            try:
                sink.read(stub, handoff, hs.endpoints, dst_block_ids, deadline)
                sink.verify(handoff, dst_block_ids)
            except KVTransferError:
                if lease_check is not None:
                    self._raise_lease_error(lease_check, deadline, strict=False)
                raise
            if lease_check is not None:
                self._raise_lease_error(lease_check, deadline, strict=True)
            seconds = time.monotonic() - start
        except KVTransferError as error:
            self.metrics.record_failure(transport, error.reason)
            if release:
                self._release_async(handoff)
            raise
        except Exception as error:  # a transport bug must not escape as a non-transfer error
            self.metrics.record_failure(transport, PeerError.reason)
            if release:
                self._release_async(handoff)
            raise PeerError(f"KV pull failed: {type(error).__name__}: {error}") from error
        nbytes = len(dst_block_ids) * self.pool.block_nbytes
        self.metrics.record_pull(transport, nbytes, len(dst_block_ids), seconds)
        if release:
            self._release_async(handoff)
        return TransferResult(transport, len(dst_block_ids), nbytes, seconds)

    def release(self, handoff: pb.KVHandoff, timeout: float = 2.0) -> bool:
        """Tell the source to free the hand-off's blocks now; False if it could not be told."""
        try:
            reply = self._stub(handoff.endpoints.grpc_address).Release(
                pb.ReleaseRequest(lease=_lease_ref(handoff)), timeout=timeout
            )
        except grpc.RpcError as error:
            log.info("KV release of %s failed: %s", handoff.lease_id, error_of(error, "Release"))
            return False
        return reply.released

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the releases sent by earlier pulls have been answered (or failed)."""
        end = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            with contextlib.suppress(Exception):  # logged by the callback; flushing only waits
                future.result(timeout=max(0.0, end - time.monotonic()))

    def _release_async(self, handoff: pb.KVHandoff, timeout: float = 2.0) -> None:
        try:
            future = self._stub(handoff.endpoints.grpc_address).Release.future(
                pb.ReleaseRequest(lease=_lease_ref(handoff)), timeout=timeout
            )
        except Exception:  # e.g. a malformed address: the lease will expire instead
            log.info("KV release of %s could not be sent", handoff.lease_id, exc_info=True)
            return
        with self._lock:
            self._pending.add(future)

        def done(f) -> None:
            with self._lock:
                self._pending.discard(f)
            if f.exception() is not None:
                log.info("KV release of %s failed: %s", handoff.lease_id, f.exception())

        future.add_done_callback(done)

    def handshake(self, address: str, timeout: float = 5.0) -> pb.HandshakeResponse:
        """Check compatibility with the source at ``address``; cache and return its answer."""
        request = pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION,
            compat=self.compat.to_proto(),
            compat_hash=self.compat_hash,
            engine_id=self.engine_id,
            transports=list(self.transports),
        )
        try:
            reply = self._stub(address).Handshake(request, timeout=timeout)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise error_of(error, f"Handshake with {address}") from None
            # A source restarted on the same address (a container restart keeps the pod IP):
            # the cached channel may sit in reconnect backoff. One fresh channel decides.
            self._evict(address)
            try:
                reply = self._stub(address).Handshake(request, timeout=timeout)
            except grpc.RpcError as retry_error:
                raise error_of(retry_error, f"Handshake with {address}") from None
        if not layout_matches(reply.layout, self.pool):
            raise IncompatiblePeerError(
                f"block layout of {address} ({reply.layout}) differs from ours "
                f"({self.pool.layout()})",
                differences=("layout",),
            )
        with self._lock:
            self._handshakes[address] = reply
        return reply

    def close(self) -> None:
        self.flush(timeout=2.0)
        for sink in self._sinks.values():
            sink.close()
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    # -- steps -----------------------------------------------------------------------------
    def _check_handoff(self, handoff: pb.KVHandoff, dst_block_ids: Sequence[int]) -> None:
        if handoff.protocol_version != PROTOCOL_VERSION:
            raise IncompatiblePeerError(
                f"hand-off protocol_version {handoff.protocol_version}, ours {PROTOCOL_VERSION}",
                differences=("protocol_version",),
            )
        n = len(handoff.block_ids)
        if len(dst_block_ids) != n or len(handoff.block_checksums) != n:
            raise InvalidHandoffError(
                f"hand-off has {n} blocks and {len(handoff.block_checksums)} checksums, "
                f"{len(dst_block_ids)} destination blocks given"
            )
        if len(set(dst_block_ids)) != n:
            raise InvalidHandoffError("destination block ids repeat")
        try:
            self.pool.check_block_ids(dst_block_ids, "destination block ids")
        except ValueError as error:
            raise InvalidHandoffError(str(error)) from None
        if not handoff.endpoints.grpc_address:
            raise InvalidHandoffError("hand-off has no KVService address")

    def _handshake_for(self, handoff: pb.KVHandoff, deadline: float) -> pb.HandshakeResponse:
        address = handoff.endpoints.grpc_address
        with self._lock:
            hs = self._handshakes.get(address)
        if hs is None or hs.epoch != handoff.epoch or hs.engine_id != handoff.engine_id:
            hs = self.handshake(address, timeout=self._remaining(deadline, "Handshake"))
        if hs.engine_id != handoff.engine_id or hs.epoch != handoff.epoch:
            raise EpochMismatchError(
                f"hand-off from {handoff.engine_id} epoch {handoff.epoch:#x}, but {address} now "
                f"serves {hs.engine_id} epoch {hs.epoch:#x} (the source restarted)"
            )
        if handoff.compat_hash != self.compat_hash:  # handshake passed: the hand-off is odd
            raise IncompatiblePeerError(
                f"hand-off compat hash {handoff.compat_hash} is not ours ({self.compat_hash})",
                differences=("compat_hash",),
            )
        return hs

    def _choose(self, hs: pb.HandshakeResponse) -> str:
        offered = set(hs.endpoints.transports)
        for transport in self.transports:
            if transport in offered and transport in self._sinks:
                return transport
        raise TransportUnavailableError(
            f"no common KV transport: ours {self.transports}, theirs {sorted(offered)}"
        )

    def _raise_lease_error(self, lease_check, deadline: float, strict: bool) -> None:
        """Raise the lease's own error (expired, restarted source) if the source gave one.

        ``strict``: also raise when the answer did not come in time (after a successful read);
        otherwise (after a failed read) the transport's own error stands.
        """
        try:
            lease_check.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as error:
            reason = error_of(error, "ExtendLease")
            if strict or isinstance(reason, LeaseExpiredError | EpochMismatchError):
                raise reason from None
        except Exception:
            if strict:
                raise TransferTimeoutError("ExtendLease: no answer before the deadline") from None

    def _stub(self, address: str) -> pb_grpc.KVServiceStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                self._channels[address] = channel
        return pb_grpc.KVServiceStub(channel)

    def _evict(self, address: str) -> None:
        with self._lock:
            channel = self._channels.pop(address, None)
            self._handshakes.pop(address, None)
        if channel is not None:
            channel.close()

    @staticmethod
    def _remaining(deadline: float, what: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeoutError(f"{what}: the pull's deadline passed")
        return remaining


def _lease_ref(handoff: pb.KVHandoff) -> pb.LeaseRef:
    return pb.LeaseRef(lease_id=handoff.lease_id, engine_id=handoff.engine_id, epoch=handoff.epoch)
