"""The prefill server: runs prompts, samples the first tokens, leases the prompt's KV blocks.

gRPC services: PrefillService (this module), KVService (reads of leased blocks, from
``splitserve.kvtransfer``), EngineService (info, stats, KV events) and grpc health.

Who frees a prompt's blocks, on every path:
- the engine, while the prompt runs (a cancelled ``Prefill`` aborts it there);
- this servicer, between the prompt's end and the lease grant (cancelled, or the grant failed);
- the lease, once granted: released by the decode pod, by ``Abort`` (the router, when the client
  left before a decode pod took the hand-off), by expiry, or at shutdown; each frees once;
- the orphan reaper, last: blocks held with no live lease and no ``Prefill`` in flight for them
  are reclaimed (and counted, since it means a bug elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    PrefillOutput,
    RequestRejectedError,
)
from splitserve.kvtransfer.source import KVBlockSource
from splitserve.observability import logs, tracing
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.request_checks import check_prefill_request
from splitserve.protocol.wire import finish_to_proto, logprobs_to_proto, params_from_proto
from splitserve.services.common.drain import Drain
from splitserve.services.common.lora import lora_status, request_adapter
from splitserve.services.common.metrics import EngineMetrics

log = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        source: KVBlockSource,
        metrics: EngineMetrics,
        orphan_grace_s: float = 10.0,
        drain: Drain | None = None,
    ) -> None:
        self.engine = engine
        self.source = source
        self.metrics = metrics
        self.orphan_grace_s = orphan_grace_s
        self.drain = drain or Drain()
        self._inflight: set[str] = set()  # Prefill calls not yet answered (their holds are owned)

    def idle(self) -> bool:
        """No prompt running and no live lease: nothing a drain still has to wait for."""
        return not self._inflight and not self.source.leased_requests()

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        # Draining: no new prompts (the router retries elsewhere); KV reads go on (KVService).
        await self.drain.refuse_if_draining(context)
        metadata = tracing.call_metadata(context)
        logs.bind_from_metadata(metadata)
        with tracing.server_span(
            "prefill", metadata, {"splitserve.engine_request_id": request.request_id}
        ) as span:
            return await self._prefill(request, context, span)

    async def _prefill(self, request: pb.PrefillRequest, context, span) -> pb.PrefillResponse:
        if request.protocol_version and request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol_version {request.protocol_version} != {PROTOCOL_VERSION}",
            )
        try:
            facts = self.engine.facts
            check_prefill_request(
                request, vocab_size=facts.vocab_size, max_model_len=facts.max_model_len
            )
            params = params_from_proto(request.sampling_params, request.extra_keys)
            lora = request_adapter(self.engine, request)
        except (ValueError, TypeError, OverflowError) as exc:
            await context.abort(lora_status(exc) or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rid = request.request_id
        if rid in self._inflight:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r} is running")
        if rid in self.source.leased_requests():  # its blocks are still held under that id
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r} holds a lease")
        self._inflight.add(rid)
        start = time.monotonic()
        try:
            try:
                out = await self.engine.prefill(rid, list(request.prompt_token_ids), params, lora)
            except ValueError as exc:
                await context.abort(lora_status(exc) or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except RequestRejectedError as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except EngineDeadError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, str(exc))
            done = time.monotonic()
            self.metrics.prefill_done(out.num_prompt_tokens, done - start, out.timing)
            _trace_prefill(span, out, done)
            response = _response(out)
            if out.held_block_ids:
                with tracing.span("kv.lease", {"splitserve.blocks": len(out.held_block_ids)}):
                    response.handoff.CopyFrom(await self._grant(out))
            log.info(
                "prefill %s: %d prompt tokens (%d cached) in %.1f ms, %d blocks leased",
                rid, out.num_prompt_tokens, out.num_cached_tokens, (done - start) * 1e3,
                len(out.held_block_ids),
            )  # fmt: skip
            return response
        finally:
            self._inflight.discard(rid)

    async def _grant(self, out: PrefillOutput) -> pb.KVHandoff:
        """Lease the held blocks. If anything fails or the caller is cancelled, they go back."""
        rid = out.request_id
        grant = asyncio.get_running_loop().run_in_executor(
            None, self.source.grant, rid, list(out.held_block_ids), out.num_prompt_tokens
        )

        def give_back(_: asyncio.Future) -> None:
            # After the grant thread is done (a lease may exist by then): end the lease, then
            # make sure the hold is gone too (both are no-ops if already done).
            self.source.release_request(rid)
            self.engine.release_kv_soon(rid)

        try:
            return await asyncio.shield(grant)
        except BaseException:
            grant.add_done_callback(give_back)
            raise

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        """Stop requests now: their lease first (so nobody reads blocks being freed), then the
        engine's prompt or hold."""
        n = 0
        for rid in request.request_ids:
            released = await asyncio.to_thread(self.source.release_request, rid)
            aborted = await self.engine.abort(rid)
            n += bool(released or aborted)
        return pb.AbortResponse(num_aborted=n)

    async def reap_orphans(self, interval_s: float = 5.0) -> None:
        """Forever: reclaim blocks held with no live lease and no Prefill answering for them."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._reap_once()
            except EngineDeadError:
                return
            except Exception:  # the reaper must survive whatever one pass meets
                log.exception("orphan KV reaper failed")

    async def _reap_once(self) -> int:
        held = await self.engine.held_requests()
        if not held:
            return 0
        leased = self.source.leased_requests()
        now = time.monotonic()
        reclaimed = 0
        for rid, since in held.items():
            if rid in leased or rid in self._inflight or now - since < self.orphan_grace_s:
                continue
            n = await self.engine.release_kv(rid)
            reclaimed += n
            log.error(
                "reclaimed %d KV blocks held for request %s for %.0f s with no live lease",
                n, rid, now - since,
            )  # fmt: skip
        if reclaimed:
            self.metrics.blocks_reclaimed.inc(reclaimed)
        return reclaimed


def _trace_prefill(span, out: PrefillOutput, done: float) -> None:
    """The prompt's queue and compute spans, from the engine's timing (ending at ``done``)."""
    if span is None:
        return
    tracing.set_attributes(span, {
        "splitserve.prompt_tokens": out.num_prompt_tokens,
        "splitserve.cached_tokens": out.num_cached_tokens,
    })  # fmt: skip
    t = out.timing
    if t is not None:
        scheduled = done - t.prefill
        tracing.record_interval("prefill.queue", scheduled - t.queued, scheduled)
        tracing.record_interval(
            "prefill.compute", scheduled, done, {"splitserve.preemptions": t.num_preemptions}
        )


def _response(out: PrefillOutput) -> pb.PrefillResponse:
    response = pb.PrefillResponse(
        num_cached_tokens=out.num_cached_tokens, num_prompt_tokens=out.num_prompt_tokens
    )
    for t in out.first_tokens:
        first = response.first_tokens.add(
            token_id=t.token_id, finish_reason=finish_to_proto(t.finish_reason)
        )
        if t.logprobs is not None:
            first.logprobs.CopyFrom(logprobs_to_proto(t.logprobs))
    if out.prompt_logprobs:
        response.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in out.prompt_logprobs)
    return response
