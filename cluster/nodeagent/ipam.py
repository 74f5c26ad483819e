"""Pod IPs from the node's pod CIDR, persisted so a restarted agent never hands one out twice."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class PoolExhausted(Exception):
    """Every address of the pod CIDR is in use."""


class IPAllocator:
    """Maps pod UIDs to addresses; one JSON file, updated under an exclusive lock.

    The same UID always gets the same address back until it is released, so a pod whose agent
    restarted keeps its IP. Addresses are handed out lowest first, skipping the network, broadcast
    and gateway addresses.
    """

    def __init__(
        self, path: Path, cidr: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address
    ) -> None:
        self.path = path
        self.cidr = cidr
        self.gateway = gateway
        path.parent.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table: dict[str, str] = json.loads(self.path.read_text()) if self.path.exists() else {}
            before = dict(table)
            yield table
            if table != before:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
                os.replace(tmp, self.path)

    def allocate(self, uid: str) -> ipaddress.IPv4Address:
        """The pod's address: its existing one, else the lowest free one."""
        with self._locked() as table:
            if uid in table:
                return ipaddress.IPv4Address(table[uid])
            used = set(table.values())
            for host in self.cidr.hosts():
                if host != self.gateway and str(host) not in used:
                    table[uid] = str(host)
                    return host
        raise PoolExhausted(f"no free address left in {self.cidr}")

    def release(self, uid: str) -> None:
        with self._locked() as table:
            table.pop(uid, None)

    def retain_only(self, uids: Iterable[str]) -> list[str]:
        """Release every address whose pod is not in `uids`; returns the released UIDs."""
        keep = set(uids)
        with self._locked() as table:
            gone = [u for u in table if u not in keep]
            for u in gone:
                del table[u]
        return gone

    def allocations(self) -> dict[str, str]:
        with self._locked() as table:
            return dict(table)
