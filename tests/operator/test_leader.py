"""Lease-based leader election over HTTP (kmock's emulator), with a hand-driven clock.

kmock keeps objects but never bumps resourceVersion, so the conflict path (two candidates
writing at once) is shown on the real API server instead (tests/e2e/test_operator_ha.py); here:
who may take the lease when, renewal, loss after the renew deadline, release, and the metrics
and health endpoints of the operator process.
"""

from __future__ import annotations

import asyncio

import aiohttp
import kmock
import pytest

from splitserve.operator import health
from splitserve.operator.kube import Credentials, KubeApi
from splitserve.operator.leader import LEASES, LeaderElector, LeaseConfig, desired_spec, lead

pytestmark = pytest.mark.timeout(60)
NS = "ops"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api():
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
            kind="Lease", namespaced=True, verbs={"get", "list", "create", "update", "delete"}
        )
        client = KubeApi(lambda: Credentials(server=str(server.url)))
        yield client
        await client.close()


def config(identity: str) -> LeaseConfig:
    return LeaseConfig(namespace=NS, identity=identity, lease_duration_s=15, renew_deadline_s=10,
                       retry_period_s=0.01)  # fmt: skip


async def holder(api: KubeApi) -> str | None:
    lease = await api.get(LEASES, NS, "splitserve-operator")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def test_desired_spec_counts_transitions() -> None:
    c = config("b")
    taken = desired_spec(
        {"holderIdentity": "a", "leaseTransitions": 2, "acquireTime": "t0"}, c, "t1"
    )
    assert taken == {"holderIdentity": "b", "leaseDurationSeconds": 15, "acquireTime": "t1",
                     "renewTime": "t1", "leaseTransitions": 3}  # fmt: skip
    renewed = desired_spec(taken, c, "t2")
    assert (renewed["acquireTime"], renewed["renewTime"], renewed["leaseTransitions"]) == (
        "t1", "t2", 3,
    )  # fmt: skip


async def test_one_leader_until_the_lease_stands_still_for_a_whole_duration(api) -> None:
    clock = Clock()
    changes: list[tuple[str, bool]] = []
    a = LeaderElector(api, config("a"), lambda v: changes.append(("a", v)), clock)
    b = LeaderElector(api, config("b"), lambda v: changes.append(("b", v)), clock)
    assert await a.try_acquire_or_renew()  # creates the Lease
    assert await holder(api) == "a"
    assert not await b.try_acquire_or_renew()  # held, and b just started watching it
    clock.now += 14
    assert not await b.try_acquire_or_renew()  # not yet a whole lease without change
    assert await a.try_acquire_or_renew()  # a renews
    assert not await b.try_acquire_or_renew()  # b sees a new record: its wait starts again
    clock.now += 14
    assert not await b.try_acquire_or_renew()
    clock.now += 2  # 16 s without a renewal, by b's own clock
    assert await b.try_acquire_or_renew()
    assert await holder(api) == "b"
    # a, renewing late, finds b's fresh record: it may not take it back.
    assert not await a.try_acquire_or_renew()
    lease = await api.get(LEASES, NS, "splitserve-operator")
    assert lease["spec"]["leaseTransitions"] == 2


async def test_leader_stops_after_the_renew_deadline_and_release_frees_the_lease(api) -> None:
    clock = Clock()
    a = LeaderElector(api, config("a"), clock=clock)
    b = LeaderElector(api, config("b"), clock=clock)
    stop = asyncio.Event()
    assert await a.acquire(stop) and a.is_leader
    assert not await b.try_acquire_or_renew()
    # a's renewals stop reaching the server, say: b takes the lease over after expiry.
    clock.now += 20
    assert await b.try_acquire_or_renew() and await holder(api) == "b"
    # a now fails to renew, and it is past its renew deadline: it stops leading.
    await asyncio.wait_for(a.renew_until_lost(stop), timeout=5)
    assert not a.is_leader
    # A clean stop releases: the next candidate need not wait for expiry.
    c = LeaderElector(api, config("c"), clock=clock)
    b.is_leader = True
    await b.release()
    assert await holder(api) is None
    assert await c.try_acquire_or_renew()


async def test_lead_runs_the_work_only_while_leading_and_releases_at_the_end(api) -> None:
    elector = LeaderElector(api, config("a"))
    stop = asyncio.Event()
    ran = asyncio.Event()

    async def work(work_stop: asyncio.Event) -> None:
        assert elector.is_leader
        ran.set()
        await work_stop.wait()

    task = asyncio.create_task(lead(elector, stop, work))
    await asyncio.wait_for(ran.wait(), timeout=5)
    assert await holder(api) == "a"
    stop.set()
    assert await asyncio.wait_for(task, timeout=5) is True
    assert await holder(api) is None and not elector.is_leader


async def test_health_endpoints_and_metrics() -> None:
    metrics = health.OperatorMetrics()
    leading = {"value": False}
    state = health.HealthState(leader_election=True, is_leader=lambda: leading["value"])
    runner = await health.serve(health.make_app(state, metrics), "127.0.0.1", 0)
    port = runner.addresses[0][1]
    with metrics.observe("timer") as report:
        report("apply_failed", "ApplyFailed")
    with pytest.raises(RuntimeError), metrics.observe("change"):
        raise RuntimeError("boom")
    metrics.set_ready("ns/a", "True")
    metrics.set_ready("ns/b", "False")
    metrics.set_ready("ns/b", None)
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, str]:
            async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                return r.status, await r.text()

        assert (await get("/readyz"))[0] == 200  # a standby that reaches the API is ready
        state.api_reachable = lambda: False
        assert (await get("/readyz"))[0] == 503
        state.reconciling = True
        assert (await get("/readyz"))[0] == 200
        assert (await get("/healthz"))[0] == 200
        state.lease_lost = True
        assert (await get("/healthz"))[0] == 503
        status, text = await get("/metrics")
    await runner.cleanup()
    assert status == 200
    assert 'splitserve_operator_reconcile_total{result="apply_failed",trigger="timer"} 1.0' in text
    assert 'splitserve_operator_reconcile_total{result="retry",trigger="change"} 1.0' in text
    assert 'splitserve_operator_reconcile_errors_total{reason="ApplyFailed"} 1.0' in text
    assert 'splitserve_operator_reconcile_errors_total{reason="RuntimeError"} 1.0' in text
    assert 'splitserve_operator_reconcile_duration_seconds_count{trigger="timer"} 1.0' in text
    assert 'splitserve_operator_inferenceservices{ready="True"} 1.0' in text
    assert 'splitserve_operator_inferenceservices{ready="False"} 0.0' in text
    assert "splitserve_operator_leader 0.0" in text
