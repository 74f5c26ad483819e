"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection package does it.

Several operator replicas may run; only the one holding the Lease reconciles. The holder renews
it every ``retry_period_s``; the others try as often and take it over once it has not changed for
``lease_duration_s`` as *they* observed it (their own monotonic clock, never a comparison of two
machines' wall clocks). Every write is a patch conditional on the resourceVersion read, so two
candidates can never both win. A leader that cannot renew within ``renew_deadline_s`` stops
leading (the caller exits, and its replacement starts as a candidate); a leader that shuts down
cleanly releases the Lease, so a standby takes over at once rather than after expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from splitserve.operator.kube import ApiError, KindInfo, KubeApi

LEASES = KindInfo("coordination.k8s.io/v1", "Lease", "leases")
log = logging.getLogger("splitserve.operator.leader")


@dataclass(frozen=True)
class LeaseConfig:
    """client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period."""

    namespace: str
    identity: str
    name: str = "splitserve-operator"
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError("need lease_duration_s > renew_deadline_s > retry_period_s > 0")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def desired_spec(current: dict, config: LeaseConfig, now: str) -> dict:
    """The Lease spec this candidate writes when it takes or renews the lease."""
    ours = current.get("holderIdentity") == config.identity
    transitions = int(current.get("leaseTransitions") or 0)
    return {
        "holderIdentity": config.identity,
        "leaseDurationSeconds": int(config.lease_duration_s),
        "acquireTime": current.get("acquireTime") if ours else now,
        "renewTime": now,
        "leaseTransitions": transitions if ours else transitions + 1,
    }


class LeaderElector:
    """One candidate. ``is_leader`` and ``healthy`` are read by the readiness endpoint."""

    def __init__(
        self,
        api: KubeApi,
        config: LeaseConfig,
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.config, self.clock = api, config, clock
        self.on_change = on_change
        self.is_leader = False
        self.healthy = False  # the last attempt reached the API server
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._last_renew = 0.0

    def _expired(self, holder: str, renew: str) -> bool:
        """Whether the record has stood still for a whole lease, by our own clock."""
        if (holder, renew) != self._observed:
            self._observed, self._observed_at = (holder, renew), self.clock()
            return not holder  # a released lease is free at once
        return not holder or self.clock() - self._observed_at > self.config.lease_duration_s

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the lease afterwards."""
        c = self.config
        try:
            lease = await self.api.get(LEASES, c.namespace, c.name)
            if lease is None:
                body = {
                    "apiVersion": LEASES.api_version,
                    "kind": LEASES.kind,
                    "metadata": {"name": c.name, "namespace": c.namespace},
                    "spec": desired_spec({}, c, _now()),
                }
                await self.api.create(LEASES, c.namespace, body)
                self.healthy = True
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            renew = spec.get("renewTime") or ""
            expired = self._expired(holder, renew)
            self.healthy = True
            if holder != c.identity and not expired:
                return False
            await self._write(lease, desired_spec(spec, c, _now()))
            return True
        except ApiError as exc:
            if exc.status == 409:  # another candidate wrote first
                self.healthy = True
                return False
            self.healthy = False
            log.warning("lease %s/%s: %s", c.namespace, c.name, exc)
            return False
        except (OSError, TimeoutError) as exc:
            self.healthy = False
            log.warning("lease %s/%s: cannot reach the API server: %s", c.namespace, c.name, exc)
            return False

    async def _write(self, lease: dict, spec: dict) -> None:
        """Conditional on the resourceVersion read: of two candidates, one write wins."""
        meta = lease["metadata"]
        version = str(meta.get("resourceVersion") or "")
        await self.api.patch_unchanged(LEASES, self.config.namespace, meta["name"], version, spec)

    def _set_leader(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            log.info(
                "%s %s the lease %s/%s",
                self.config.identity,
                "acquired" if leading else "lost",
                self.config.namespace,
                self.config.name,
            )
            self.on_change(leading)

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Try every retry period until this candidate leads (True) or ``stop`` is set."""
        while not stop.is_set():
            if await self.try_acquire_or_renew():
                self._last_renew = self.clock()
                self._set_leader(True)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.retry_period_s)
        return False

    async def renew_until_lost(self, stop: asyncio.Event) -> None:
        """While leading: renew every retry period; return when renewing failed for longer
        than the renew deadline (the lease is then presumed lost) or when ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.retry_period_s)
            if stop.is_set():
                return
            if await self.try_acquire_or_renew():
                self._last_renew = self.clock()
            elif self.clock() - self._last_renew > self.config.renew_deadline_s:
                self._set_leader(False)
                return

    async def release(self) -> None:
        """Give the lease up (holder cleared), so a standby need not wait for it to expire."""
        if not self.is_leader:
            return
        c = self.config
        try:
            lease = await self.api.get(LEASES, c.namespace, c.name)
            spec = (lease or {}).get("spec") or {}
            if lease is not None and spec.get("holderIdentity") == c.identity:
                released = {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _now()}
                await self._write(lease, released)
                log.info("%s released the lease %s/%s", c.identity, c.namespace, c.name)
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("releasing the lease failed (it will expire): %s", exc)
        self._set_leader(False)


async def lead(
    elector: LeaderElector,
    stop: asyncio.Event,
    work: Callable[[asyncio.Event], Awaitable[None]],
) -> bool:
    """Wait for the lease, run ``work(work_stop)`` while holding it, release it at the end.

    Returns False when the lease was lost (the caller should exit non-zero: the replacement
    process starts as a candidate, as client-go's leaders do), True on a clean stop.
    """
    if not await elector.acquire(stop):
        return True
    work_stop = asyncio.Event()
    renewer = asyncio.create_task(elector.renew_until_lost(stop))
    worker = asyncio.create_task(work(work_stop))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({renewer, worker, waiter}, return_when=asyncio.FIRST_COMPLETED)
    lost = renewer.done() and not stop.is_set()
    work_stop.set()  # the lease is lost or we are stopping: reconcile no more
    await worker
    waiter.cancel()
    stop.set()
    await renewer
    if not lost:
        await elector.release()
    return not lost
