"""The serving side of KV hand-offs: lease blocks, describe them, serve reads of leased blocks.

One ``KVBlockSource`` per prefill engine process. The prefill server calls ``grant`` when a prompt
is done (its blocks then belong to the lease, not the scheduler), mounts ``KVServicer`` on its gRPC
server, and gives an ``end_lease`` callback that returns a lease's blocks to the engine's pool.
That callback runs exactly once per lease (release, expiry, abort or shutdown) and may run on a
gRPC or reaper thread, so it must be thread-safe (e.g. hand the ids to the engine loop).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from splitserve.kvtransfer.checksum import block_checksums, byte_view
from splitserve.kvtransfer.compat import check_compatible
from splitserve.kvtransfer.errors import (
    IncompatiblePeerError,
    InvalidHandoffError,
    TransportUnavailableError,
)
from splitserve.kvtransfer.grpc_transport import WireChunk
from splitserve.kvtransfer.leases import Lease, LeaseTable
from splitserve.kvtransfer.metrics import TransferMetrics
from splitserve.kvtransfer.pool import KVPool
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.kv_compat import CompatInfo, kv_compat_hash

log = logging.getLogger(__name__)

TRANSPORTS = ("nixl", "grpc")
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class SourceConfig:
    """How a source identifies itself and what it offers."""

    engine_id: str
    compat: CompatInfo
    grpc_address: str  # host:port that readers dial for KVService (advertised in hand-offs)
    transports: tuple[str, ...] = TRANSPORTS  # offered, in preference order
    lease_seconds: float = 30.0
    max_lease_seconds: float = 600.0
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        unknown = set(self.transports) - set(TRANSPORTS)
        if unknown or not self.transports:
            raise ValueError(f"transports must be a non-empty subset of {TRANSPORTS}")
        if not 64 << 10 <= self.max_chunk_bytes <= 64 << 20:
            raise ValueError(
                f"max_chunk_bytes must be in [64 KiB, 64 MiB], got {self.max_chunk_bytes}"
            )


class KVBlockSource:
    """Serves an engine's leased KV blocks to readers (gRPC here; NIXL reads are one-sided).

    Thread-safe. ``epoch`` is a fresh random 64-bit number per instance unless given: a restarted
    process can never accept a hand-off issued by its previous incarnation.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        config: SourceConfig,
        end_lease: Callable[[Lease], None],
        *,
        epoch: int | None = None,
        metrics: TransferMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = KVPool(kv_cache)
        self._check_pool_matches(config.compat)
        self.config = config
        self.epoch = secrets.randbits(64) if epoch is None else epoch
        self.compat_hash = kv_compat_hash(config.compat)
        self.metrics = metrics or TransferMetrics()
        self.leases = LeaseTable(self.epoch, config.lease_seconds, config.max_lease_seconds, clock)
        self._end_lease = end_lease  # gets the Lease: its request id and block ids
        # CPU pools are served straight from their memory; other devices are staged through
        # host memory one chunk at a time (the "staged" path, exercised on CPU by the tests).
        self._staged = not self.pool.is_cpu
        self._blocks_u8 = (
            None
            if self._staged
            else byte_view(self.pool.blocks_u8()).reshape(self.pool.num_blocks, -1)
        )
        self._nixl = None
        if "nixl" in config.transports:
            from splitserve.kvtransfer.nixl_transport import NixlSource

            self._nixl = NixlSource(self.pool, agent_name=f"{config.engine_id}-{self.epoch:016x}")
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    # -- hand-offs -------------------------------------------------------------------------
    def grant(
        self,
        request_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        ttl: float | None = None,
    ) -> pb.KVHandoff:
        """Lease ``block_ids`` (prompt order) for a reader and describe them in a hand-off.

        From now on the blocks belong to the lease: the engine must not free or overwrite them
        until ``end_lease`` is called for this lease.
        """
        self.pool.check_block_ids(block_ids)
        bs = self.pool.block_size
        if not (len(block_ids) - 1) * bs < num_tokens <= len(block_ids) * bs:
            raise ValueError(f"{num_tokens} tokens do not fill {len(block_ids)} blocks of {bs}")
        checksums = block_checksums(self.pool.kv_cache, block_ids)
        lease = self.leases.grant(request_id, block_ids, ttl)
        self.metrics.leases_granted.inc()
        self.metrics.leases_active.set(len(self.leases))
        return pb.KVHandoff(
            protocol_version=PROTOCOL_VERSION,
            request_id=request_id,
            engine_id=self.config.engine_id,
            epoch=self.epoch,
            lease_id=lease.lease_id,
            block_ids=list(block_ids),
            num_tokens=num_tokens,
            block_size=bs,
            layout=self.pool.layout(),
            compat_hash=self.compat_hash,
            lease_expiry_unix_ms=lease.expiry_unix_ms,
            block_checksums=checksums,
            endpoints=self.endpoints(),
        )

    def endpoints(self) -> pb.TransportEndpoints:
        ep = pb.TransportEndpoints(
            grpc_address=self.config.grpc_address, transports=list(self.config.transports)
        )
        if self._nixl is not None:
            ep.nixl.CopyFrom(self._nixl.endpoint())
        return ep

    # -- lease transitions (each frees a lease's blocks exactly once) -----------------------
    def release(self, lease_id: str, epoch: int) -> int:
        """End a lease early; returns the number of blocks given back (0 if it was not live)."""
        lease = self.leases.release(lease_id, epoch)
        if lease is None:
            return 0
        self.metrics.leases_released.inc()
        self._free(lease)
        return len(lease.block_ids)

    def release_request(self, request_id: str) -> int:
        """End every lease of an aborted request; returns the number of blocks given back."""
        leases = self.leases.release_request(request_id)
        for lease in leases:
            self.metrics.leases_released.inc()
            self._free(lease)
        return sum(len(lease.block_ids) for lease in leases)

    def leased_requests(self) -> set[str]:
        """Request ids with a live lease."""
        return {lease.request_id for lease in self.leases.leases()}

    def extend(self, lease_id: str, epoch: int, ttl: float | None = None) -> Lease:
        return self.leases.extend(lease_id, epoch, ttl)

    def reap(self, now: float | None = None) -> list[Lease]:
        """Expire due leases and free their blocks; call periodically (or ``start_reaper``)."""
        expired = self.leases.expire_due(now)
        for lease in expired:
            log.warning(
                "KV lease %s of request %s expired unreleased; freeing %d blocks",
                lease.lease_id,
                lease.request_id,
                len(lease.block_ids),
            )
            self.metrics.record_expired()
            self._free(lease)
        return expired

    def start_reaper(self, interval: float = 0.5) -> None:
        """Reap expired leases every ``interval`` seconds on a daemon thread until ``close``."""
        if self._reaper is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reap()
                except Exception:  # the reaper must survive a failing free callback
                    log.exception("KV lease reaper failed")

        self._reaper = threading.Thread(target=loop, name="kv-lease-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        """Stop the reaper, free every leased block, release NIXL registrations."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        for lease in self.leases.release_all():
            self._free(lease)
        if self._nixl is not None:
            self._nixl.close()
            self._nixl = None

    # -- serving reads ---------------------------------------------------------------------
    def handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        """Check a reader's compatibility; answer with the transports both sides support."""
        if request.protocol_version != PROTOCOL_VERSION:
            raise IncompatiblePeerError(
                f"protocol_version: source={PROTOCOL_VERSION} reader={request.protocol_version}",
                differences=("protocol_version",),
            )
        check_compatible(
            self.config.compat, CompatInfo.from_proto(request.compat), ("source", "reader")
        )
        offered = [t for t in request.transports if t in self.config.transports]
        if not offered:
            raise TransportUnavailableError(
                f"no common KV transport: reader wants {list(request.transports)}, "
                f"this engine offers {list(self.config.transports)}"
            )
        endpoints = self.endpoints()
        del endpoints.transports[:]
        endpoints.transports.extend(offered)
        return pb.HandshakeResponse(
            protocol_version=PROTOCOL_VERSION,
            engine_id=self.config.engine_id,
            epoch=self.epoch,
            compat=self.config.compat.to_proto(),
            compat_hash=self.compat_hash,
            endpoints=endpoints,
            layout=self.pool.layout(),
        )

    def read_blocks(self, request: pb.ReadBlocksRequest) -> Iterator[WireChunk]:
        """Validate a read (epoch, compat, lease, ids), extend the lease, then yield the bytes.

        Validation happens before the first message, so a refused read fails with no data sent.
        The chunks are ``WireChunk``s: ``ReadBlocksResponse`` messages that serialize straight
        from the pool's memory (see ``KVServicer``).
        """
        ref = request.lease
        if request.compat_hash != self.compat_hash:
            raise IncompatiblePeerError(
                f"compat hash {request.compat_hash!r} is not this engine's {self.compat_hash!r}",
                differences=("compat_hash",),
            )
        lease = self.leases.get(ref.lease_id, ref.epoch)
        block_ids = list(request.block_ids) or list(lease.block_ids)
        missing = set(block_ids) - set(lease.block_ids)
        if missing:
            raise InvalidHandoffError(
                f"blocks {sorted(missing)[:8]} are not in lease {ref.lease_id}"
            )
        self.leases.extend(ref.lease_id, ref.epoch)  # the reader is active: keep the blocks
        chunk = request.max_chunk_bytes or self.config.max_chunk_bytes
        chunk = max(64 << 10, min(chunk, self.config.max_chunk_bytes))
        return self._chunks(block_ids, chunk)

    def _chunks(self, block_ids: list[int], chunk: int) -> Iterator[WireChunk]:
        bn = self.pool.block_nbytes
        total = bn * len(block_ids)
        rows = self.pool.blocks_u8() if self._staged else self._blocks_u8
        first = pb.ReadBlocksResponse(
            block_ids=block_ids,
            block_checksums=block_checksums(self.pool.kv_cache, block_ids),
            total_bytes=total,
            block_nbytes=bn,
        )
        offset = 0
        while offset < total:
            end = min(offset + chunk, total)
            parts = []
            pos = offset
            while pos < end:
                j, within = divmod(pos, bn)
                take = min(bn - within, end - pos)
                parts.append(rows[block_ids[j], within : within + take])
                pos += take
            if self._staged:  # one device-to-host copy of the chunk
                parts = [torch.cat(parts).cpu().numpy()]
            header = first if offset == 0 else pb.ReadBlocksResponse()
            header.offset = offset
            yield WireChunk(header, parts, end - offset)
            offset = end
        self.metrics.record_transfer("grpc", "sent", total, len(block_ids))

    # -- helpers ---------------------------------------------------------------------------
    def _free(self, lease: Lease) -> None:
        self.metrics.leases_active.set(len(self.leases))
        self._end_lease(lease)

    def _check_pool_matches(self, compat: CompatInfo) -> None:
        p = self.pool
        pool_facts = (p.dtype_name, p.block_size, p.num_layers, p.num_kv_heads, p.head_dim)
        compat_facts = (
            compat.dtype,
            compat.block_size,
            compat.num_layers,
            compat.num_kv_heads,
            compat.head_dim,
        )
        if pool_facts != compat_facts:
            raise ValueError(
                f"kv_cache shape/dtype {pool_facts} does not match compat {compat_facts}"
            )
