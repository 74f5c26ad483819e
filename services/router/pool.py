"""The set of engine pods the router can use, their load and their cache contents.

Discovery (static list or Kubernetes) calls ``set_endpoints``; the pool then keeps, per pod, a gRPC
client, its model facts (``GetInfo``, asked once per pod incarnation, recorded in the
``ModelCatalog``), a stats poller (``GetStats``: queues, KV usage, health) and a KV-event
subscriber that feeds the precise prefix index. A pod is routable while it is listed by discovery,
not draining, its facts are known, its last stats poll succeeded and it says it is serving; a
failed call marks it unhealthy until the next successful poll.

A *draining* pod (its EndpointSlice endpoint is terminating, or it reports ``draining``) gets no
new work but stays in the pool with its channel open, so the streams already on it run to their
last token; it leaves when discovery stops listing it (the pod is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.labels import DECODE, PREFILL
from splitserve.protocol.lora import AdapterInfo
from splitserve.services.router.engine_client import EngineClient
from splitserve.services.router.errors import BackendError
from splitserve.services.router.kv_events import ResyncNeeded, StreamCursor, apply_batch
from splitserve.services.router.model_facts import ModelCatalog
from splitserve.services.router.policy import Candidate
from splitserve.services.router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

# How long requests in flight on a pod that left the endpoint set may run before its channel is
# cancelled (its engine server drains in-flight work in a few seconds when terminated).
REMOVED_POD_GRACE_S = 60.0


@dataclass(frozen=True)
class Endpoint:
    """One engine pod as discovery sees it."""

    address: str  # host:port of its gRPC server
    roles: frozenset[str]  # {"prefill"}, {"decode"} or both (colocated)
    rollout_hash: str = ""  # the pod's rollout-hash label ("" when unknown: local mode)
    name: str = ""  # pod name, for logs
    draining: bool = False  # terminating: keep its streams, send it nothing new

    def same_pod(self, other: Endpoint) -> bool:
        """The same pod incarnation, whatever its draining state."""
        return dataclasses.replace(self, draining=False) == dataclasses.replace(
            other, draining=False
        )

    @property
    def pod_id(self) -> str:
        return self.address

    @property
    def colocated(self) -> bool:
        return PREFILL in self.roles and DECODE in self.roles


@dataclass
class PodState:
    endpoint: Endpoint
    client: EngineClient
    info: pb.EngineInfo | None = None  # None until the pod answered GetInfo
    stats: pb.EngineStats | None = None
    healthy: bool = False
    inflight: int = 0
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.info.block_size if self.info else 16

    @property
    def tokenizer_id(self) -> str:
        return self.info.tokenizer_id if self.info else ""

    @property
    def kv_compat_hash(self) -> str:
        return self.info.kv_compat_hash if self.info else ""

    def pairs_with(self, decode: PodState) -> bool:
        """Whether this prefill pod's KV blocks mean the same thing on ``decode``: the engines'
        own KV compatibility hashes and tokenizers match, and so do the operator's rollout
        labels (no request crosses versions mid-rollout; unlabelled pods pair by facts alone)."""
        a, b = self.endpoint.rollout_hash, decode.endpoint.rollout_hash
        return (
            self.kv_compat_hash == decode.kv_compat_hash
            and self.tokenizer_id == decode.tokenizer_id
            and (not a or not b or a == b)
        )

    def candidate(self, matched_blocks: int, adapter: AdapterInfo | None = None) -> Candidate:
        s = self.stats
        return Candidate(
            pod_id=self.endpoint.pod_id,
            matched_blocks=matched_blocks,
            running=s.num_requests_running if s else 0,
            waiting=s.num_requests_waiting if s else 0,
            kv_usage=s.kv_cache_usage if s else 0.0,
            inflight=self.inflight,
            adapter_affinity=self.adapter_affinity(adapter),
        )

    def adapter_affinity(self, adapter: AdapterInfo | None) -> int:
        """+1: requests with this adapter run here now (it is resident: no slot to swap);
        -1: the pod's slots are all taken by other adapters (the request would wait for one)."""
        s, info = self.stats, self.info
        if adapter is None or s is None or info is None:
            return 0
        if adapter.name in s.running_lora_adapters:
            return 1
        busy = set(s.running_lora_adapters) | set(s.waiting_lora_adapters)
        return -1 if len(busy) >= info.max_loras > 0 else 0


class Pool:
    """Pods by id, with their background pollers. Runs on one asyncio loop."""

    def __init__(
        self,
        index: PrefixIndex,
        catalog: ModelCatalog,
        *,
        stats_interval_s: float = 0.5,
        use_kv_events: bool = True,
        on_info: Callable[[PodState], Awaitable[None]] | None = None,
    ) -> None:
        self.on_info = on_info  # called (as a task) whenever a pod's facts were (re)learned
        self.index = index
        self.catalog = catalog
        self.stats_interval_s = stats_interval_s
        self.use_kv_events = use_kv_events
        self.pods: dict[str, PodState] = {}
        self.changed = asyncio.Event()

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Make the pod set equal ``endpoints``: start new pods' pollers, stop removed ones.

        A known pod that turns draining stays (its streams finish on it); a draining pod the
        pool never knew is not added (nothing of ours runs there).
        """
        wanted = {e.pod_id: e for e in endpoints}
        for pod_id in list(self.pods):
            state, new = self.pods[pod_id], wanted.get(pod_id)
            if new is not None and new.same_pod(state.endpoint):
                if new.draining and not state.endpoint.draining:
                    log.info(
                        "pod %s is draining: no new requests, %d in flight finish there",
                        new.address, state.inflight,
                    )  # fmt: skip
                state.endpoint = new
            else:
                self._remove(pod_id)
        for pod_id, endpoint in wanted.items():
            if pod_id not in self.pods and not endpoint.draining:
                self._add(endpoint)
        self.changed.set()

    def _add(self, endpoint: Endpoint) -> None:
        state = PodState(endpoint, EngineClient(endpoint.address))
        self.pods[endpoint.pod_id] = state
        state.tasks.append(asyncio.create_task(self._poll_stats(state)))

    def _remove(self, pod_id: str) -> None:
        state = self.pods.pop(pod_id)
        for task in state.tasks:
            task.cancel()
        self.index.drop_pod(pod_id)
        self.catalog.remove_pod(pod_id)
        # A pod leaves the endpoint set when it starts terminating, while requests may still
        # run on it (its server drains them): let them finish rather than cancel them.
        asyncio.get_running_loop().create_task(state.client.close(grace=REMOVED_POD_GRACE_S))

    async def close(self) -> None:
        for pod_id in list(self.pods):
            self._remove(pod_id)
        await asyncio.sleep(0)

    def ready(self, role: str) -> list[PodState]:
        """Pods of ``role`` that may take new work (healthy, not draining)."""
        return [
            p
            for p in self.pods.values()
            if p.healthy and not p.endpoint.draining and role in p.endpoint.roles
        ]

    def changing_over(self) -> bool:
        """Some pod is draining (terminating, or its engine says so): pods are being replaced or
        removed on purpose (a rollout, a scale-down), so no ready pair is likely a moment's gap
        while their successors are learned, not an outage."""
        return any(
            p.endpoint.draining or (p.stats is not None and p.stats.health_reason == "draining")
            for p in self.pods.values()
        )

    def mark_failed(self, pod_id: str) -> None:
        """A call failed for a pod-level reason: stop routing there until a poll succeeds."""
        state = self.pods.get(pod_id)
        if state is not None:
            state.healthy = False

    async def refresh(self, state: PodState) -> None:
        try:
            stats = await state.client.stats()
            if state.info is None or stats.epoch != state.info.epoch:
                await self._learn(state)  # first contact, or the pod restarted
            elif stats.lora_adapters_version != state.info.lora_adapters_version:
                await self.relearn(state)  # its LoRA adapters changed
            state.stats = stats
            state.healthy = stats.serving and state.info is not None
        except BackendError:
            state.healthy = False

    async def _learn(self, state: PodState) -> None:
        """Ask a pod for its model facts; a pod whose facts are unusable stays out of routing."""
        info = await state.client.info()
        try:
            self.catalog.add_pod(state.endpoint.pod_id, info)
        except ValueError as err:
            log.error("pod %s left out: %s", state.endpoint.address, err)
            raise BackendError(str(err), retryable=True, pod=state.endpoint.pod_id) from err
        first = state.info is None
        state.info = info
        if first and self.use_kv_events:
            state.tasks.append(asyncio.create_task(self._follow_kv_events(state)))
        if self.on_info is not None:
            state.tasks.append(asyncio.create_task(self.on_info(state)))

    async def relearn(self, state: PodState) -> None:
        """Ask a known pod for its facts again (its LoRA adapters changed)."""
        info = await state.client.info()
        if state.info is not None and info.epoch == state.info.epoch:
            state.info = info

    async def _poll_stats(self, state: PodState) -> None:
        while True:
            was = state.healthy
            await self.refresh(state)
            if was != state.healthy:
                why = state.stats.health_reason if state.stats and not state.healthy else ""
                log.info(
                    "pod %s is %s%s", state.endpoint.address,
                    "ready" if state.healthy else "down", f" ({why})" if why else "",
                )  # fmt: skip
                self.changed.set()
            await asyncio.sleep(self.stats_interval_s)

    async def _follow_kv_events(self, state: PodState) -> None:
        """Mirror the pod's prefix cache; reconnect (with a snapshot) after any break."""
        blocks = self.index.pod(state.endpoint.pod_id)
        delay = 0.2
        while True:
            cursor = StreamCursor()
            call = state.client.subscribe_kv_events(snapshot=True)
            try:
                async for batch in call:
                    apply_batch(blocks, cursor, batch)
                    blocks.live = True
                    delay = 0.2
            except ResyncNeeded as why:
                log.info("pod %s KV events resync: %s", state.endpoint.address, why)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("pod %s has no KV events: approximate index", state.endpoint.address)
                    blocks.live = False
                    return
            finally:
                call.cancel()
            blocks.live = False
            blocks.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


@contextlib.contextmanager
def track_inflight(state: PodState):
    """Count a request against a pod while it runs (fresher than polled stats)."""
    state.inflight += 1
    try:
        yield state
    finally:
        state.inflight -= 1
