"""EngineService (both pods): model facts, load stats and the KV events of the prefix index."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.block_pool import BlockStored, KVEvent
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.lora import LoRARequest, check_adapter_name
from splitserve.protocol.wire import adapter_to_proto
from splitserve.services.common.drain import DRAINING_REASON, Drain
from splitserve.services.common.lora import lora_status

log = logging.getLogger(__name__)
_MAX_BACKLOG = 10_000  # batches; a subscriber this far behind is cut off and must resync


class KVEventHub:
    """Numbers KV event batches and fans them out to subscribers' queues.

    ``publish`` and ``subscribe`` run on the engine thread (so a subscription's snapshot lines
    up with the batches that follow it); ``unsubscribe`` may run anywhere.
    """

    def __init__(self, engine_id: str, epoch: int, block_size: int) -> None:
        self.engine_id = engine_id
        self.epoch = epoch
        self.block_size = block_size
        self.sequence = 0
        self._subs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()

    def _batch(self, events: list[KVEvent], snapshot: bool = False) -> pb.KVEventBatch:
        out = []
        if snapshot:
            out.append(pb.KVEvent(cleared=pb.AllCleared()))
        for ev in events:
            if isinstance(ev, BlockStored):
                stored = pb.BlockStored(
                    block_hashes=[ev.block_hash],
                    token_ids=list(ev.token_ids),
                    block_size=self.block_size,
                )
                if ev.parent_hash is not None:
                    stored.parent_block_hash = ev.parent_hash
                out.append(pb.KVEvent(stored=stored))
            else:
                out.append(pb.KVEvent(removed=pb.BlockRemoved(block_hashes=[ev.block_hash])))
        return pb.KVEventBatch(
            engine_id=self.engine_id,
            epoch=self.epoch,
            sequence=self.sequence,
            timestamp_unix_ms=int(time.time() * 1000),
            events=out,
            snapshot=snapshot,
        )

    def publish(self, events: list[KVEvent]) -> None:
        self.sequence += 1
        with self._lock:
            subs = list(self._subs.items())
        if not subs:
            return
        batch = self._batch(events)
        for key, (loop, q) in subs:
            if q.qsize() > _MAX_BACKLOG:
                self.unsubscribe(key)
                loop.call_soon_threadsafe(q.put_nowait, None)  # cut off: it must resync
            else:
                loop.call_soon_threadsafe(q.put_nowait, batch)

    def subscribe(self, key: int, loop, q: asyncio.Queue, snapshot: list[BlockStored] | None):
        with self._lock:
            self._subs[key] = (loop, q)
        if snapshot is not None:
            batch = self._batch(list(snapshot), snapshot=True)
            loop.call_soon_threadsafe(q.put_nowait, batch)

    def unsubscribe(self, key: int) -> None:
        with self._lock:
            self._subs.pop(key, None)


class EngineServicer(pb_grpc.EngineServiceServicer):
    """Model facts, load and KV events of one engine, for the router."""

    def __init__(
        self,
        engine: AsyncEngine,
        info: pb.EngineInfo,
        active_leases: Callable[[], int] = lambda: 0,
        drain: Drain | None = None,
    ) -> None:
        self.engine = engine
        self.info = info
        self.active_leases = active_leases
        self.drain = drain or Drain()
        self.hub = KVEventHub(info.engine_id, info.epoch, info.block_size)
        engine.add_kv_event_sink(self.hub.publish)

    async def GetInfo(self, request, context) -> pb.EngineInfo:
        if not self.info.lora_enabled:
            return self.info
        info = pb.EngineInfo()
        info.CopyFrom(self.info)
        info.lora_adapters.extend(adapter_to_proto(a) for a in self.engine.lora_adapters())
        info.lora_adapters_version = self.engine.lora_version
        return info

    async def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest, context) -> pb.LoRAAdapter:
        """Load an adapter (vLLM's /v1/load_lora_adapter on this engine); the same files
        under the same name again succeed as a no-op."""
        try:
            check_adapter_name(request.lora_name)
            lora = LoRARequest(request.lora_name, request.lora_int_id or 1, request.lora_path)
            info = await self.engine.add_lora(lora)
        except ValueError as exc:
            code = lora_status(exc) or grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        log.info("LoRA adapter %s loaded from %s (rank %d)", info.name, info.path, info.rank)
        return adapter_to_proto(info)

    async def UnloadLoRAAdapter(
        self, request: pb.UnloadLoRAAdapterRequest, context
    ) -> pb.UnloadLoRAAdapterResponse:
        """Unload an adapter; its running requests finish with it first."""
        try:
            unloaded = await self.engine.remove_lora(request.lora_name)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        if unloaded:
            log.info("LoRA adapter %s unloaded", request.lora_name)
        return pb.UnloadLoRAAdapterResponse(unloaded=unloaded)

    async def GetStats(self, request, context) -> pb.EngineStats:
        s = self.engine.stats()
        health = self.engine.health()
        # A draining pod is alive but takes no new work: the router stops choosing it and
        # keeps the streams already on it.
        serving, reason = health.serving, health.reason
        if self.drain.draining:
            serving, reason = False, DRAINING_REASON
        return pb.EngineStats(
            engine_id=self.info.engine_id,
            epoch=self.info.epoch,
            role=self.info.role,
            num_requests_running=s.num_running,
            num_requests_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_blocks_total=s.num_blocks,
            num_blocks_free=s.num_free_blocks,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_active_leases=self.active_leases(),
            protocol_version=PROTOCOL_VERSION,
            model=self.info.served_model_name,
            block_size=self.info.block_size,
            kv_events_sequence=self.hub.sequence,
            serving=serving,
            health_reason=reason,
            kv_blocks_unaccounted=self.engine.audit().unaccounted,
            lora_adapters_version=self.engine.lora_version,
            running_lora_adapters=s.running_loras,
            waiting_lora_adapters=s.waiting_loras,
        )

    async def SubscribeKVEvents(self, request, context) -> AsyncIterator[pb.KVEventBatch]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        key = id(q)
        await self.engine.kv_cache_snapshot(
            lambda blocks: self.hub.subscribe(key, loop, q, blocks if request.snapshot else None)
        )
        try:
            while True:
                batch = await q.get()
                if batch is None:
                    return
                yield batch
        finally:
            self.hub.unsubscribe(key)
