"""The operator process: kopf's reconcile loop, under a Lease when several replicas run, beside
the health and metrics server (`splitserve operator run`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

import kopf

from splitserve.operator import health
from splitserve.operator.handlers import credentials_from, make_registry
from splitserve.operator.kube import KubeApi
from splitserve.operator.leader import LeaderElector, LeaseConfig, lead
from splitserve.operator.login import default_login

log = logging.getLogger("splitserve.operator")


@dataclass(frozen=True)
class RunConfig:
    identity: str  # the pod's name: kopf's peer identity and the Lease holder's
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    interval: float = 30.0  # seconds between drift-correcting passes
    autoscale_interval: float = 10.0  # seconds between autoscaling passes
    health_port: int = 8080  # 0: no /healthz, /readyz, /metrics
    lease: LeaseConfig | None = None  # None: no leader election (run one replica)


async def operate(config: RunConfig) -> int:
    """Run until SIGTERM/SIGINT (0) or until the Lease is lost (1: the process should exit, so
    its replacement starts as a candidate)."""
    metrics = health.OperatorMetrics()
    registry = make_registry(
        interval=config.interval, autoscale_interval=config.autoscale_interval, metrics=metrics
    )
    state = health.HealthState(leader_election=config.lease is not None)
    runner = None
    if config.health_port:
        runner = await health.serve(health.make_app(state, metrics), "0.0.0.0", config.health_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def reconcile_until(work_stop: asyncio.Event) -> None:
        state.reconciling = True
        try:
            await kopf.operator(
                registry=registry,
                identity=config.identity,
                standalone=True,  # exclusivity comes from the Lease, not kopf's peering
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                stop_flag=work_stop,
            )
        finally:
            state.reconciling = False

    api = None
    try:
        if config.lease is None:
            await reconcile_until(stop)
            return 0
        api = KubeApi(lambda: credentials_from(default_login()))
        lease = config.lease
        elector = LeaderElector(api, lease, on_change=lambda leading: metrics.leader.set(leading))
        state.is_leader = lambda: elector.is_leader
        state.api_reachable = lambda: elector.healthy
        log.info("%s waits for the lease %s/%s", lease.identity, lease.namespace, lease.name)
        if await lead(elector, stop, reconcile_until):
            return 0
        state.lease_lost = True
        print("error: lost the leader lease; exiting so a fresh candidate starts", file=sys.stderr)
        return 1
    finally:
        if api is not None:
            await api.close()
        if runner is not None:
            await runner.cleanup()
