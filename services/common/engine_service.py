"""EngineService (both pods): load stats and the KV-event stream the router's prefix index uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_pool import BlockStored, KVEvent
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
PROTOCOL_VERSION = pb.PROTOCOL_VERSION
_MAX_BACKLOG = 10_000  # batches; a subscriber this far behind is cut off and must resync


class KVEventHub:
    """Numbers KV event batches and fans them out. Mutated only on the engine thread."""

    def __init__(self, engine_id: str, epoch: int, block_size: int) -> None:
        self.engine_id = engine_id
        self.epoch = epoch
        self.block_size = block_size
        self.sequence = 0
        self._subs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}

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
        if not self._subs:
            return
        batch = self._batch(events)
        for key, (loop, q) in list(self._subs.items()):
            if q.qsize() > _MAX_BACKLOG:
                del self._subs[key]
                loop.call_soon_threadsafe(q.put_nowait, None)  # cut off: it must resync
            else:
                loop.call_soon_threadsafe(q.put_nowait, batch)

    def subscribe(self, key: int, loop, q: asyncio.Queue, snapshot: list[BlockStored] | None):
        self._subs[key] = (loop, q)
        if snapshot is not None:
            q.put_nowait(self._batch(list(snapshot), snapshot=True))

    def unsubscribe(self, key: int) -> None:
        self._subs.pop(key, None)


class EngineServicer(pb_grpc.EngineServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        role: str,
        engine_id: str,
        epoch: int,
        model_name: str,
        active_leases: Callable[[], int] = lambda: 0,
    ) -> None:
        self.engine = engine
        self.role = role
        self.engine_id = engine_id
        self.epoch = epoch
        self.model_name = model_name
        self.active_leases = active_leases
        self.hub = KVEventHub(engine_id, epoch, engine.core.kv.block_size)
        engine.add_kv_event_sink(self.hub.publish)

    async def GetStats(self, request, context) -> pb.EngineStats:
        s = self.engine.core.stats()
        return pb.EngineStats(
            engine_id=self.engine_id,
            epoch=self.epoch,
            role=self.role,
            num_requests_running=s.num_running,
            num_requests_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_blocks_total=s.num_blocks,
            num_blocks_free=s.num_free_blocks,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_active_leases=self.active_leases(),
            protocol_version=PROTOCOL_VERSION,
            model=self.model_name,
            block_size=self.engine.core.kv.block_size,
            kv_events_sequence=self.hub.sequence,
        )

    async def SubscribeKVEvents(self, request, context) -> AsyncIterator[pb.KVEventBatch]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        key = id(q)
        pool = self.engine.core.kv.pool

        def register() -> None:  # on the engine thread: snapshot and stream line up exactly
            self.hub.subscribe(key, loop, q, pool.cached_blocks() if request.snapshot else None)

        await self.engine.call(register)
        try:
            while True:
                batch = await q.get()
                if batch is None:
                    return
                yield batch
        finally:
            self.engine.submit(lambda: self.hub.unsubscribe(key))
