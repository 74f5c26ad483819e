"""The engine's public async surface: servers drive an ``EngineCore`` only through this.

The core steps on its own thread. Every mutation of engine state happens on that thread, between
steps, through a FIFO command queue; results and per-step deltas come back to the event loop with
``call_soon_threadsafe``. So the engine needs no locks, a slow client never stalls the batch, and
servers never touch the core (or its pool, scheduler or grammar cache) themselves.

Cancellation is part of the contract. Commands run in the order they were submitted, so an abort
submitted after an add always finds the request: a caller cancelled while its request is being
added still gets it aborted. Leaving any stream early aborts the request and frees its blocks,
including blocks the request left held for a hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from splitserve.engine.block_pool import BlockStored, KVEvent
from splitserve.engine.engine_core import EngineCore, EngineStats, KVAudit
from splitserve.engine.heap import HeapTrimmer
from splitserve.engine.openmp import serial_in_this_thread
from splitserve.engine.outputs import (
    ImportReservation,
    RequestTiming,
    SequenceDelta,
    coalesce_deltas,
)
from splitserve.protocol.logprobs import TokenLogprobs
from splitserve.protocol.lora import AdapterInfo, LoRARequest
from splitserve.protocol.sampling import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread hit an internal error; requests in flight were failed, not dropped."""


class RequestRejectedError(RuntimeError):
    """The engine dropped a request it had accepted (e.g. it waited past the queue timeout)."""


@dataclass(frozen=True)
class EngineFacts:
    """What the loaded engine is: fixed at start, readable from any thread."""

    model_dir: str
    max_model_len: int  # after the engine's caps (pool size, sliding window)
    vocab_size: int  # logits width: token ids must be below it
    block_size: int
    num_blocks: int
    max_num_seqs: int
    eos_token_ids: tuple[int, ...]
    # The KV pool's layout (what a KV compatibility check compares)
    kv_dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # LoRA (0 when disabled)
    lora_enabled: bool = False
    max_loras: int = 0
    max_lora_rank: int = 0


@dataclass(frozen=True)
class FirstToken:
    """One sample's first token, sampled by a prefill."""

    token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # set when this token already ends the sample


@dataclass(frozen=True)
class PrefillOutput:
    """A prompt run to its first tokens; its blocks stay held until ``release_kv``."""

    request_id: str
    first_tokens: tuple[FirstToken, ...]  # index i: sample i
    held_block_ids: tuple[int, ...]  # empty when every sample ended (nothing held)
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: tuple[TokenLogprobs, ...] | None
    timing: RequestTiming | None = None  # the prompt's queue and compute time on this engine

    @property
    def finished(self) -> bool:
        return all(t.finish_reason is not None for t in self.first_tokens)


@dataclass(frozen=True)
class EngineHealth:
    serving: bool
    reason: str = ""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    remaining: int  # samples not finished yet


_ERROR = object()
SLOW_STEP_S = 5.0  # a step this long is logged: aborts and new requests wait for it


def _serially(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this (worker) thread's torch ops kept serial: an OpenMP team of its
    own would slow every engine step (engine/openmp.py)."""
    serial_in_this_thread()
    return fn(*args)


class AsyncEngine:
    """Runs one ``EngineCore`` on a thread and offers what servers need as coroutines.

    ``stall_seconds``: with work waiting, no step for this long marks the engine not serving.
    """

    def __init__(
        self, core: EngineCore, idle_poll_s: float = 0.05, stall_seconds: float = 30.0
    ) -> None:
        self._core = core
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._event_sinks: list[Callable[[list[KVEvent]], None]] = []
        self._idle_poll_s = idle_poll_s
        self._stall_seconds = stall_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None
        self.steps = 0
        self._last_progress = time.monotonic()
        self._stats = core.stats()
        self._audit = core.audit()
        self._heap = HeapTrimmer()
        self.facts = EngineFacts(
            model_dir=str(core.model_dir),
            max_model_len=core.max_model_len,
            vocab_size=core.shape.vocab_size,
            block_size=core.kv.block_size,
            num_blocks=core.kv.pool.num_blocks,
            max_num_seqs=core.config.scheduler.max_num_seqs,
            eos_token_ids=tuple(sorted(core.eos_ids)),
            kv_dtype=str(core.kv_cache.dtype).removeprefix("torch."),
            num_layers=core.shape.num_layers,
            num_kv_heads=core.shape.num_kv_heads,
            head_dim=core.shape.head_dim,
            lora_enabled=core.lora is not None,
            max_loras=core.lora.config.max_loras if core.lora else 0,
            max_lora_rank=core.lora.config.max_lora_rank if core.lora else 0,
        )
        self._loras = core.lora_adapters()
        self.lora_version = 1  # bumped whenever the loaded adapters change

    @property
    def kv_cache(self):
        """The KV pool tensor (KV transfer reads and writes blocks of it by id)."""
        return self._core.kv_cache

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout)

    # --- state, readable from any thread ------------------------------------------------------
    def stats(self) -> EngineStats:
        """The counts as of the last step (a snapshot the engine thread refreshes)."""
        return self._stats

    def audit(self) -> KVAudit:
        """The KV accounting as of the last time the engine went idle."""
        return self._audit

    def health(self) -> EngineHealth:
        if self.error is not None:
            return EngineHealth(False, f"engine failed: {self.error!r}")
        s = self._stats
        if s.num_waiting and time.monotonic() - self._last_progress > self._stall_seconds:
            return EngineHealth(
                False,
                f"no progress for {time.monotonic() - self._last_progress:.0f} s with "
                f"{s.num_waiting} request(s) waiting at {100 * s.kv_cache_usage:.0f}% KV usage",
            )
        return EngineHealth(True)

    # --- LoRA adapters ------------------------------------------------------------------------
    def lora_adapters(self) -> tuple[AdapterInfo, ...]:
        """The adapters loaded now, by name (a snapshot, readable from any thread)."""
        return self._loras

    def lora_adapter(self, name: str) -> AdapterInfo | None:
        return next((a for a in self._loras if a.name == name), None)

    async def add_lora(self, lora: LoRARequest) -> AdapterInfo:
        """Load an adapter: its files are read and checked on a worker thread (steps go on),
        then it is registered between steps. ValueError names the problem; loading the same
        files under the same name again is a no-op."""
        manager = self._core.lora
        if manager is None:
            raise ValueError("LoRA is not enabled on this engine (--enable-lora)")
        adapter = await asyncio.to_thread(_serially, manager.read, lora)
        return await self._call(self._changing_loras, self._core.register_lora, adapter)

    async def remove_lora(self, name: str) -> bool:
        """Unload an adapter (False if it was not loaded); its running requests finish."""
        return await self._call(self._changing_loras, self._core.remove_lora, name)

    def _changing_loras(self, fn: Callable[..., T], *args: Any) -> T:
        """On the engine thread: change the adapters, then publish the new snapshot."""
        try:
            return fn(*args)
        finally:
            loras = self._core.lora_adapters()
            if loras != self._loras:
                self._loras = loras
                self.lora_version += 1

    # --- requests -----------------------------------------------------------------------------
    async def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field if the request can never be served.

        Runs on the engine thread: it may compile a grammar into the engine's cache.
        """
        await self._call(self._core.validate, list(prompt_token_ids), params)

    async def generate(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        lora_name: str | None = None,
    ) -> AsyncIterator[SequenceDelta]:
        """Run a request (with the loaded adapter ``lora_name``); yield its deltas until every
        sample finished.

        Bad input raises ValueError before anything is yielded (``LoRANotFoundError`` for an
        adapter that is not loaded). Leaving the iterator early (client gone, task cancelled)
        aborts the request and frees its blocks.
        """
        stream = self._open(request_id, params.n)
        async with self._owned(request_id, stream):
            await self._call(
                self._core.add_request, request_id, prompt, params, None, False, lora_name
            )
            async for delta in self._iterate(stream):
                yield delta

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        lora_name: str | None = None,
    ) -> PrefillOutput:
        """Run a prompt to the first token of each of its ``params.n`` samples.

        The prompt's blocks are then held under ``request_id`` until ``release_kv`` (a hand-off
        leases them), unless every sample already ended. Cancelled before it returns: the
        request is aborted and its blocks (held or not) are freed.
        """
        first = _first_token_params(params)
        stream = self._open(request_id, params.n)
        tokens: dict[int, FirstToken] = {}
        last: SequenceDelta | None = None
        prompt_lp = None
        async with self._owned(request_id, stream):
            await self._call(
                self._core.add_request, request_id, list(prompt_token_ids), first, None, True,
                lora_name,
            )  # fmt: skip
            async for delta in self._iterate(stream):
                if delta.token_ids:
                    lp = delta.logprobs[0] if delta.logprobs else None
                    ended = delta.finish_reason if _ends(delta, params) else None
                    tokens[delta.index] = FirstToken(delta.token_ids[0], lp, ended)
                prompt_lp = prompt_lp or delta.prompt_logprobs
                if delta.held_block_ids is not None:
                    last = delta
                last = last or delta
        assert last is not None and len(tokens) == params.n
        held = last.held_block_ids or ()
        out = PrefillOutput(
            request_id,
            tuple(tokens[i] for i in range(params.n)),
            tuple(held),
            last.num_prompt_tokens,
            last.num_cached_tokens,
            prompt_lp,
            last.timing,
        )
        if out.finished and held:
            self.release_kv_soon(request_id)
            out = replace(out, held_block_ids=())
        return out

    def release_kv_soon(self, request_id: str) -> None:
        """Free blocks held under ``request_id`` (idempotent); callable from any thread."""
        self._submit(lambda: self._core.release_kv(request_id))

    async def release_kv(self, request_id: str) -> int:
        """Free blocks held under ``request_id``; returns how many (0 if none: idempotent)."""
        return await self._call(self._core.release_kv, request_id)

    async def held_requests(self) -> dict[str, float]:
        """Request id -> monotonic time its blocks became held, for every hold."""
        return await self._call(self._core.held_since)

    async def abort(self, request_id: str) -> bool:
        """Stop every sample of a request and free its blocks; False if it was unknown."""
        return await self._call(self._core.abort_request, request_id)

    # --- KV imports (the decode side of a hand-off) -------------------------------------------
    @contextlib.asynccontextmanager
    async def kv_import(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        lora_name: str | None = None,
    ) -> AsyncIterator[KVImport]:
        """Reserve local blocks for a prompt whose KV comes from another engine.

        Inside the block, the caller copies the KV into ``imp.reservation.block_ids`` and then
        streams ``imp.commit(...)`` or ``imp.recompute(...)``. Leaving the block without either
        (an error, cancellation) gives the reservation back; leaving the stream early aborts.
        """
        stream = self._open(request_id, params.n)
        imp = KVImport(self, request_id, list(prompt_token_ids), params, stream, lora_name)
        async with self._owned(request_id, stream):
            imp.reservation = await self._call(
                self._core.reserve_import, request_id, imp.prompt, params, lora_name
            )
            yield imp

    # --- KV events ----------------------------------------------------------------------------
    def add_kv_event_sink(self, sink: Callable[[list[KVEvent]], None]) -> None:
        """Call ``sink`` on the engine thread with each step's KV events (keep it cheap)."""

        def add() -> None:
            self._core.kv.pool.publish_events = True
            self._event_sinks.append(sink)

        self._submit(add)

    async def kv_cache_snapshot(self, then: Callable[[list[BlockStored]], None]) -> None:
        """Call ``then(blocks cached now)`` on the engine thread, between steps: every event a
        sink receives afterwards happened after that snapshot (none missed, none repeated)."""
        await self._call(lambda: then(self._core.kv.pool.cached_blocks()))

    # --- plumbing -----------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
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

        self._submit(run)
        return await fut

    def _submit(self, cmd: Callable[[], None]) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        self._cmds.put(cmd)

    def _open(self, request_id: str, num_samples: int) -> _Stream:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), num_samples)
        self._streams[request_id] = stream
        return stream

    @contextlib.asynccontextmanager
    async def _owned(self, request_id: str, stream: _Stream) -> AsyncIterator[None]:
        """The one place a request's life on this engine ends: unless every sample finished,
        the request is aborted (after whatever command added it: the queue is FIFO)."""
        try:
            yield
        finally:
            self._streams.pop(request_id, None)
            if stream.remaining > 0 and self.error is None:
                self._submit(lambda: self._core.abort_request(request_id))

    async def _iterate(self, stream: _Stream) -> AsyncIterator[SequenceDelta]:
        """The stream's deltas. A consumer that fell behind gets what waits for it merged per
        sample (``coalesce_deltas``): the same tokens, text and logprobs in fewer messages, so
        the per-token cost downstream (gRPC, SSE) is paid per message, not per token."""
        while stream.remaining > 0:
            items = [await stream.queue.get()]
            while not stream.queue.empty():
                items.append(stream.queue.get_nowait())
            if _ERROR not in items:
                items = coalesce_deltas(items)
            for item in items:
                if item is _ERROR:
                    raise EngineDeadError(f"engine failed: {self.error!r}")
                if item.error is not None:
                    stream.remaining = 0  # the engine already dropped it
                    raise RequestRejectedError(item.error)
                if item.finished:
                    stream.remaining -= 1
                yield item

    def _deliver(self, delta: SequenceDelta) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

    # --- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        core = self._core
        busy = False
        stuck = False  # the last step could schedule nothing: wait for a command, do not spin
        while not self._stop.is_set():
            try:
                # Block while idle (or stuck); otherwise just drain what arrived during the step.
                block = stuck or not core.has_unfinished()
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
                    busy = True
                    before, t0 = core.num_steps_run, time.monotonic()
                    for delta in core.step():
                        self._deliver(delta)
                    stuck = core.num_steps_run == before
                    self._heap.maybe_trim(idle=False)
                    if (took := time.monotonic() - t0) > SLOW_STEP_S:
                        log.warning(
                            "slow engine step: %.1f s for %d tokens of %d sequences",
                            took, core.last_step_tokens, core.last_step_seqs,
                        )  # fmt: skip
                    if not stuck:
                        self.steps += 1
                        self._last_progress = time.monotonic()
                else:
                    stuck = False
                    self._last_progress = time.monotonic()
                    if busy:  # just went idle: the cheap moment to check the books
                        busy = False
                        self._audit = core.audit()
                        if self._audit.unaccounted:
                            log.error("KV accounting broken when idle: %s", self._audit)
                        self._heap.maybe_trim(idle=True)
                self._stats = core.stats()
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


class KVImport:
    """One prompt's KV import on the decode side; made by ``AsyncEngine.kv_import`` only."""

    def __init__(
        self, engine: AsyncEngine, request_id, prompt, params, stream, lora_name=None
    ) -> None:
        self._engine = engine
        self.lora_name: str | None = lora_name
        self.request_id = request_id
        self.prompt: list[int] = prompt
        self.params: SamplingParams = params
        self._stream: _Stream = stream
        self.reservation: ImportReservation | None = None
        self._started = False

    async def commit(self, first_tokens: Sequence[FirstToken]) -> AsyncIterator[SequenceDelta]:
        """The reserved blocks now hold the prompt's KV: continue each sample after its first
        token (the n samples share the prompt's blocks, copy-on-write)."""
        core = self._engine._core  # noqa: SLF001 - the engine's own helper
        deltas = await self._start(core.commit_import, self.request_id, _pairs(first_tokens))
        async for delta in self._stream_from(deltas):
            yield delta

    async def recompute(self, first_tokens: Sequence[FirstToken]) -> AsyncIterator[SequenceDelta]:
        """Compute the prompt here after all (the pull failed or nothing was reserved), keeping
        the first tokens sampled elsewhere: the same greedy output as the hand-off."""
        core = self._engine._core  # noqa: SLF001
        deltas = await self._start(
            core.recompute_import, self.request_id, self.prompt, self.params,
            _pairs(first_tokens), self.lora_name,
        )  # fmt: skip
        async for delta in self._stream_from(deltas):
            yield delta

    async def _start(self, fn, *args) -> list[SequenceDelta]:
        if self._started:
            raise RuntimeError("a KV import is committed or recomputed once")
        self._started = True
        return await self._engine._call(fn, *args)  # noqa: SLF001

    async def _stream_from(self, first: list[SequenceDelta]) -> AsyncIterator[SequenceDelta]:
        for delta in first:
            if delta.finished:
                self._stream.remaining -= 1
            yield delta
        async for delta in self._engine._iterate(self._stream):  # noqa: SLF001
            yield delta


def _pairs(first_tokens: Sequence[FirstToken]) -> list[tuple[int, TokenLogprobs | None]]:
    return [(t.token_id, t.logprobs) for t in first_tokens]


def _first_token_params(params: SamplingParams) -> SamplingParams:
    """Only the first token is sampled on a prefill; stop strings are the decode side's job."""
    return replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=())


def _ends(delta: SequenceDelta, params: SamplingParams) -> bool:
    """Whether a prefill's first token ends the real request (not just the 1-token prefill)."""
    return delta.finish_reason == "stop" or params.max_tokens == 1


def _set_result(fut: asyncio.Future, result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
