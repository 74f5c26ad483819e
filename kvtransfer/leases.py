"""The lease table: which KV blocks a prefill engine holds for which hand-off, and until when.

A prefill pod keeps a prompt's blocks only while a decode pod may still read them. Each hand-off
holds one lease; the lease ends exactly once, by ``release`` (the reader is done, or the request was
aborted) or by ``expire_due`` (the reader vanished), and the caller then returns the lease's block
references to its pool. A block may sit in several leases at once (two prompts sharing a cached
prefix): each lease owns one reference, so the pool's reference counts stay right.

Pure bookkeeping: no threads, no I/O, an injectable clock (unix seconds, because hand-offs carry
the expiry as unix milliseconds). Every method is safe to call from several threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from splitserve.kvtransfer.errors import EpochMismatchError, LeaseExpiredError


@dataclass(frozen=True)
class Lease:
    """One hand-off's hold on a list of blocks (immutable: extending returns a new Lease)."""

    lease_id: str
    request_id: str
    block_ids: tuple[int, ...]
    epoch: int
    granted_at: float  # unix seconds
    expires_at: float  # unix seconds

    @property
    def expiry_unix_ms(self) -> int:
        return int(self.expires_at * 1000)


class LeaseTable:
    """Thread-safe table of live leases for one engine incarnation (``epoch``).

    Invariant (checked by ``check_integrity`` and the property tests): a lease leaves the table at
    most once, so its blocks are handed back to the pool at most once: never double-freed.
    """

    def __init__(
        self,
        epoch: int,
        default_ttl: float = 30.0,
        max_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if default_ttl <= 0 or max_ttl < default_ttl:
            raise ValueError(f"need 0 < default_ttl <= max_ttl, got {default_ttl}, {max_ttl}")
        self.epoch = epoch
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def now(self) -> float:
        return self._clock()

    def leases(self) -> list[Lease]:
        """A snapshot of the live leases (expired ones included until ``expire_due`` runs)."""
        with self._lock:
            return list(self._leases.values())

    def get(self, lease_id: str, epoch: int) -> Lease:
        """The live lease ``lease_id``; raises if the epoch is stale or the lease is not live.

        A lease past its expiry is refused even before ``expire_due`` has reaped it: a reader
        must never be served blocks that the pool may already consider free.
        """
        self._check_epoch(epoch)
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires_at <= self._clock():
                raise LeaseExpiredError(f"lease {lease_id!r} is expired or unknown")
            return lease

    # -- transitions -----------------------------------------------------------------------
    def grant(self, request_id: str, block_ids: Sequence[int], ttl: float | None = None) -> Lease:
        """Hold ``block_ids`` for ``request_id`` for ``ttl`` seconds (default: the table's)."""
        ttl = self._ttl(ttl)
        if any(not isinstance(b, int) or b < 0 for b in block_ids):
            raise ValueError(f"block ids must be non-negative integers, got {list(block_ids)}")
        now = self._clock()
        lease = Lease(
            lease_id=f"{request_id}:{secrets.token_hex(8)}",
            request_id=request_id,
            block_ids=tuple(block_ids),
            epoch=self.epoch,
            granted_at=now,
            expires_at=now + ttl,
        )
        with self._lock:
            self._leases[lease.lease_id] = lease
        return lease

    def extend(self, lease_id: str, epoch: int, ttl: float | None = None) -> Lease:
        """Push the expiry of a live lease to ``now + ttl``; an expired lease stays expired."""
        ttl = self._ttl(ttl)
        self._check_epoch(epoch)
        with self._lock:
            lease = self._leases.get(lease_id)
            now = self._clock()
            if lease is None or lease.expires_at <= now:
                raise LeaseExpiredError(f"lease {lease_id!r} is expired or unknown")
            lease = replace(lease, expires_at=max(lease.expires_at, now + ttl))
            self._leases[lease_id] = lease
            return lease

    def release(self, lease_id: str, epoch: int) -> Lease | None:
        """End a lease early; returns it (the caller frees its blocks) or None if not live.

        An expired-but-unreaped lease is also returned: its blocks are still held and releasing
        is the quickest way to give them back.
        """
        self._check_epoch(epoch)
        with self._lock:
            return self._leases.pop(lease_id, None)

    def release_request(self, request_id: str) -> list[Lease]:
        """End every lease of ``request_id`` (an aborted request); returns them."""
        with self._lock:
            ids = [k for k, v in self._leases.items() if v.request_id == request_id]
            return [self._leases.pop(k) for k in ids]

    def expire_due(self, now: float | None = None) -> list[Lease]:
        """Remove and return every lease whose expiry is ``<= now``; the caller frees them."""
        with self._lock:
            now = self._clock() if now is None else now
            due = [k for k, v in self._leases.items() if v.expires_at <= now]
            return [self._leases.pop(k) for k in due]

    def release_all(self) -> list[Lease]:
        """Remove and return every lease (shutdown)."""
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
            return leases

    def held_blocks(self) -> dict[int, int]:
        """block id -> number of live leases holding it (for integrity checks and stats)."""
        counts: dict[int, int] = {}
        with self._lock:
            for lease in self._leases.values():
                for b in lease.block_ids:
                    counts[b] = counts.get(b, 0) + 1
        return counts

    # -- helpers ---------------------------------------------------------------------------
    def _ttl(self, ttl: float | None) -> float:
        ttl = self.default_ttl if ttl is None else ttl
        if not 0 < ttl <= self.max_ttl:
            raise ValueError(f"lease ttl must be in (0, {self.max_ttl}] seconds, got {ttl}")
        return ttl

    def _check_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise EpochMismatchError(
                f"hand-off epoch {epoch:#x} is not the serving engine's epoch {self.epoch:#x} "
                "(the engine restarted; its old blocks are gone)"
            )
