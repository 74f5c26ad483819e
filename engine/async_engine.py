"""Drive an EngineCore from asyncio servers: the engine steps on its own thread.

Every mutation of engine state happens on the engine thread, between steps, through a command
queue; results and per-step deltas come back to the event loop with ``call_soon_threadsafe``. So the
engine needs no locks, and a slow client never stalls the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from splitserve.engine.block_pool import KVEvent
from splitserve.engine.engine_core import EngineCore
from splitserve.engine.outputs import SequenceDelta
from splitserve.protocol.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread hit an internal error; requests in flight were failed, not dropped."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # samples not finished yet


_ERROR = object()


class AsyncEngine:
    def __init__(self, core: EngineCore, idle_poll_s: float = 0.05) -> None:
        self.core = core
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._event_sinks: list[Callable[[list[KVEvent]], None]] = []
        self._idle_poll_s = idle_poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.steps = 0
        self.error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout)

    def add_kv_event_sink(self, sink: Callable[[list[KVEvent]], None]) -> None:
        """``sink`` is called on the engine thread with each step's KV events (keep it cheap)."""
        self.core.kv.pool.publish_events = True
        self._event_sinks.append(sink)

    # --- calls into the engine thread ----------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self.submit(run)
        return await fut

    def submit(self, cmd: Callable[[], None]) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        self._cmds.put(cmd)

    async def generate(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        hold_kv: bool = False,
    ) -> AsyncIterator[SequenceDelta]:
        """Add a request and yield its deltas until every sample finished.

        Bad input raises ValueError before anything is yielded. Leaving the iterator early
        (client gone, task cancelled) aborts the request and frees its blocks.
        """
        stream = self.open_stream(request_id, params.n)
        try:
            await self.call(self.core.add_request, request_id, prompt, params, None, hold_kv)
        except BaseException:
            self.close_stream(request_id)
            raise
        async for delta in self.iterate(request_id, stream):
            yield delta

    def open_stream(self, request_id: str, num_samples: int = 1) -> _Stream:
        """Register for a request's deltas before it starts (used with ``call`` for imports)."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), num_samples)
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        """Forget a stream opened with ``open_stream`` whose request never started."""
        self._streams.pop(request_id, None)

    async def iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[SequenceDelta]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _ERROR:
                    raise EngineDeadError(f"engine failed: {self.error!r}")
                yield item
                if item.finished:
                    stream.remaining -= 1
                    if stream.remaining <= 0:
                        finished = True
                        return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.error is None:
                self.submit(lambda: self.core.abort_request(request_id))

    def deliver(self, delta: SequenceDelta) -> None:
        """Hand a delta produced outside ``step`` (e.g. by commit_import) to its stream."""
        stream = self._streams.get(delta.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

    async def abort(self, request_id: str) -> bool:
        return await self.call(self.core.abort_request, request_id)

    # --- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        while not self._stop.is_set():
            try:
                # Block while idle; otherwise just drain what arrived during the last step.
                block = not core.has_unfinished()
                try:
                    cmd = (
                        self._cmds.get(timeout=self._idle_poll_s)
                        if block
                        else self._cmds.get_nowait()
                    )
                    cmd()
                    while True:
                        self._cmds.get_nowait()()
                except queue.Empty:
                    pass
                if core.has_unfinished():
                    for delta in core.step():
                        self.deliver(delta)
                    self.steps += 1
                if self._event_sinks:
                    events = core.kv.pool.take_events()
                    if events:
                        for sink in self._event_sinks:
                            sink(events)
            except Exception as exc:  # noqa: BLE001 - fail every request loudly, then stop
                log.exception("engine step failed; failing all requests in flight")
                self.error = exc
                for stream in list(self._streams.values()):
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _ERROR)
                return


def _set_result(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
