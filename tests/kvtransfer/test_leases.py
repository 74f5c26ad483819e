"""LeaseTable: the bookkeeping that decides when a prefill pod may free handed-off blocks."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.kvtransfer.errors import EpochMismatchError, LeaseExpiredError
from splitserve.kvtransfer.leases import LeaseTable


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_grant_get_release_once() -> None:
    clock = FakeClock()
    table = LeaseTable(epoch=7, default_ttl=30, clock=clock)
    lease = table.grant("r1", [4, 2, 9])
    assert lease.block_ids == (4, 2, 9)
    assert lease.expiry_unix_ms == int((clock.now + 30) * 1000)
    assert table.get(lease.lease_id, 7) == lease
    assert table.release(lease.lease_id, 7) == lease
    assert table.release(lease.lease_id, 7) is None  # a second release frees nothing
    with pytest.raises(LeaseExpiredError):
        table.get(lease.lease_id, 7)


def test_expiry_and_extension() -> None:
    clock = FakeClock()
    table = LeaseTable(epoch=1, default_ttl=10, clock=clock)
    a = table.grant("a", [1])
    b = table.grant("b", [2])
    clock.now += 5
    table.extend(b.lease_id, 1, ttl=20)
    clock.now += 5  # a is due exactly now; b lives until +25
    with pytest.raises(LeaseExpiredError):
        table.get(a.lease_id, 1)  # refused even before the reaper runs
    with pytest.raises(LeaseExpiredError):
        table.extend(a.lease_id, 1)  # an expired lease cannot be revived
    assert [lease.lease_id for lease in table.expire_due()] == [a.lease_id]
    assert table.expire_due() == []
    assert table.get(b.lease_id, 1).expires_at == 1_000 + 25
    assert table.held_blocks() == {2: 1}


def test_epoch_mismatch_is_refused() -> None:
    table = LeaseTable(epoch=0xABC)
    lease = table.grant("r", [0])
    for call in (table.get, table.extend, table.release):
        with pytest.raises(EpochMismatchError, match="restarted"):
            call(lease.lease_id, 0xABD)
    assert len(table) == 1


def test_shared_blocks_count_per_lease_and_abort() -> None:
    table = LeaseTable(epoch=1)
    table.grant("x", [1, 2])
    table.grant("x", [2, 3])
    table.grant("y", [2])
    assert table.held_blocks() == {1: 1, 2: 3, 3: 1}
    aborted = table.release_request("x")
    assert sorted(lease.block_ids for lease in aborted) == [(1, 2), (2, 3)]
    assert table.held_blocks() == {2: 1}


def test_bad_ttl_and_ids() -> None:
    table = LeaseTable(epoch=1, default_ttl=30, max_ttl=60)
    with pytest.raises(ValueError, match="ttl"):
        table.grant("r", [1], ttl=61)
    with pytest.raises(ValueError, match="ttl"):
        table.grant("r", [1], ttl=0)
    with pytest.raises(ValueError, match="non-negative"):
        table.grant("r", [-1])


def test_concurrent_release_and_expiry_free_each_lease_once() -> None:
    clock = FakeClock()
    table = LeaseTable(epoch=1, default_ttl=1, clock=clock)
    leases = [table.grant(f"r{i}", [i]) for i in range(2000)]
    clock.now += 2  # everything is due: releasers and the reaper race for every lease
    freed: list[str] = []
    lock = threading.Lock()

    def releaser(part: list) -> None:
        for lease in part:
            got = table.release(lease.lease_id, 1)
            if got is not None:
                with lock:
                    freed.append(got.lease_id)

    def reaper() -> None:
        for _ in range(50):
            for lease in table.expire_due():
                with lock:
                    freed.append(lease.lease_id)

    threads = [threading.Thread(target=releaser, args=(leases[i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=reaper))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    freed += [lease.lease_id for lease in table.expire_due()]
    assert sorted(freed) == sorted(lease.lease_id for lease in leases)  # each exactly once


class LeaseMachine(RuleBasedStateMachine):
    """Random grant / extend / release / expire / time steps against a simple model.

    Invariants: every lease leaves the table exactly once (so no block is freed twice or
    leaked), a lease is readable iff the model says it is live, held-block counts match.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.table = LeaseTable(epoch=5, default_ttl=10, max_ttl=50, clock=self.clock)
        self.model: dict[str, tuple[tuple[int, ...], float]] = {}  # id -> (blocks, expiry)
        self.ended: list[str] = []
        self.granted: list[str] = []

    @rule(blocks=st.lists(st.integers(0, 20), min_size=1, max_size=5), ttl=st.floats(0.5, 50))
    def grant(self, blocks: list[int], ttl: float) -> None:
        lease = self.table.grant("req", blocks, ttl)
        self.model[lease.lease_id] = (tuple(blocks), self.clock.now + ttl)
        self.granted.append(lease.lease_id)

    @precondition(lambda self: self.granted)
    @rule(data=st.data(), ttl=st.floats(0.5, 50))
    def extend(self, data: st.DataObject, ttl: float) -> None:
        lease_id = data.draw(st.sampled_from(self.granted))
        live = lease_id in self.model and self.model[lease_id][1] > self.clock.now
        if live:
            lease = self.table.extend(lease_id, 5, ttl)
            blocks, expiry = self.model[lease_id]
            self.model[lease_id] = (blocks, max(expiry, self.clock.now + ttl))
            assert lease.expires_at == self.model[lease_id][1]
        else:
            with pytest.raises(LeaseExpiredError):
                self.table.extend(lease_id, 5, ttl)

    @precondition(lambda self: self.granted)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(self.granted))
        got = self.table.release(lease_id, 5)
        if lease_id in self.model:
            assert got is not None and got.block_ids == self.model.pop(lease_id)[0]
            self.ended.append(lease_id)
        else:
            assert got is None

    @rule(dt=st.floats(0, 30))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def expire(self) -> None:
        due = {k for k, (_, expiry) in self.model.items() if expiry <= self.clock.now}
        got = {lease.lease_id for lease in self.table.expire_due()}
        assert got == due
        for k in due:
            del self.model[k]
        self.ended.extend(due)

    @invariant()
    def ended_once_and_counts_match(self) -> None:
        assert len(self.ended) == len(set(self.ended))
        assert set(self.ended).isdisjoint(self.model)
        assert len(self.table) == len(self.model)
        counts: dict[int, int] = {}
        for blocks, _ in self.model.values():
            for b in blocks:
                counts[b] = counts.get(b, 0) + 1
        assert self.table.held_blocks() == counts

    @invariant()
    def readable_iff_live(self) -> None:
        for lease_id in self.granted[-5:]:
            live = lease_id in self.model and self.model[lease_id][1] > self.clock.now
            try:
                self.table.get(lease_id, 5)
                assert live
            except LeaseExpiredError:
                assert not live


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
