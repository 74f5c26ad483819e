"""Pod IP allocation: lowest free first, stable per pod, persisted across agent restarts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from splitserve.cluster.nodeagent.ipam import IPAllocator, PoolExhausted

CIDR = ipaddress.IPv4Network("10.244.0.0/24")
GATEWAY = ipaddress.IPv4Address("10.244.0.1")


def test_allocation_is_stable_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "ipam.json"
    a = IPAllocator(path, CIDR, GATEWAY)
    assert str(a.allocate("pod-a")) == "10.244.0.2"  # .0 network, .1 gateway skipped
    assert str(a.allocate("pod-b")) == "10.244.0.3"
    assert str(a.allocate("pod-a")) == "10.244.0.2"  # same pod, same address
    # A restarted agent reads the table back: no address is handed out twice.
    b = IPAllocator(path, CIDR, GATEWAY)
    assert str(b.allocate("pod-c")) == "10.244.0.4"
    assert str(b.allocate("pod-b")) == "10.244.0.3"
    b.release("pod-a")
    assert str(b.allocate("pod-d")) == "10.244.0.2"  # freed addresses are reused


def test_retain_only_releases_pods_that_are_gone(tmp_path: Path) -> None:
    a = IPAllocator(tmp_path / "ipam.json", CIDR, GATEWAY)
    for uid in ("x", "y", "z"):
        a.allocate(uid)
    assert sorted(a.retain_only(["y"])) == ["x", "z"]
    assert a.allocations() == {"y": "10.244.0.3"}


def test_exhaustion(tmp_path: Path) -> None:
    small = ipaddress.IPv4Network("10.244.0.0/30")  # hosts .1 (gateway) and .2
    a = IPAllocator(tmp_path / "ipam.json", small, GATEWAY)
    assert str(a.allocate("one")) == "10.244.0.2"
    with pytest.raises(PoolExhausted):
        a.allocate("two")
