"""The decode server: imports a prompt's KV from a prefill pod, then streams generated tokens.

Colocated pods (``--colocated``) also accept requests without a hand-off and run the prompt
themselves. The import belongs to ``KVConnector`` (reserve, pull, commit or recompute, release
the lease once); this module turns requests into engine calls and deltas into messages. A failed
pull never hangs and never yields wrong tokens: with the ``recompute`` policy the prompt is
recomputed here (same greedy output), with ``fail`` the stream ends with an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestRejectedError
from splitserve.engine.outputs import RequestTiming, SequenceDelta
from splitserve.observability import logs, tracing
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.request_checks import check_generate_request
from splitserve.protocol.wire import finish_to_proto, logprobs_to_proto, params_from_proto
from splitserve.services.common.drain import Drain
from splitserve.services.common.lora import lora_status, request_adapter
from splitserve.services.common.metrics import EngineMetrics, FinishedRequest
from splitserve.services.decode.kv_connector import KVConnector, KVImportFailed

log = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        connector: KVConnector,
        metrics: EngineMetrics,
        colocated: bool = False,
        drain: Drain | None = None,
    ) -> None:
        self.engine = engine
        self.connector = connector
        self.metrics = metrics
        self.colocated = colocated
        self.drain = drain or Drain()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        n = 0
        for rid in request.request_ids:
            n += bool(await self.engine.abort(rid))
        return pb.AbortResponse(num_aborted=n)

    async def Generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        # Draining: no new streams (the router retries elsewhere); those running finish.
        await self.drain.refuse_if_draining(context)
        with self.drain.track():
            async for message in self._traced(request, context):
                yield message

    async def _traced(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        metadata = tracing.call_metadata(context)
        logs.bind_from_metadata(metadata)
        attrs = {"splitserve.engine_request_id": request.request.request_id,
                 "splitserve.handoff": request.HasField("prefill")}  # fmt: skip
        span = tracing.start_server_span("decode", metadata, attrs)
        try:
            async with contextlib.aclosing(self._generate(request, context)) as messages:
                while True:
                    with tracing.using(span):  # current for the step only, never across yield
                        try:
                            message = await anext(messages)
                        except StopAsyncIteration:
                            break
                    yield message
        finally:
            tracing.end_span(span)

    async def _generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = request.request
        rid = req.request_id
        handed_off = request.HasField("prefill")
        if request.protocol_version and request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol_version {request.protocol_version} != {PROTOCOL_VERSION}",
            )
        try:
            facts = self.engine.facts
            check_generate_request(
                request, vocab_size=facts.vocab_size, max_model_len=facts.max_model_len,
                block_size=facts.block_size,
            )  # fmt: skip
            params = params_from_proto(req.sampling_params, req.extra_keys)
            if not handed_off and not self.colocated:
                raise ValueError("this decode pod is not colocated: a prefill hand-off is required")
            lora = request_adapter(self.engine, req)
        except (ValueError, TypeError, OverflowError) as exc:
            await context.abort(lora_status(exc) or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        start = time.monotonic()
        info = pb.KVTransferInfo()
        prompt = list(req.prompt_token_ids)
        if handed_off:
            # Prompt logprobs came with the hand-off: asking again would only cost this pod its
            # prefix-cache hits (such requests bypass the cache).
            local = params if params.prompt_logprobs is None else _without_prompt_logprobs(params)
            deltas = self.connector.stream(rid, prompt, local, request.prefill, info, lora)
        else:
            deltas = self.engine.generate(rid, prompt, params, lora)
        try:
            async for message in self._responses(rid, deltas, info, start, handed_off, params):
                yield message
        except ValueError as exc:
            await context.abort(lora_status(exc) or grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RequestRejectedError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except KVImportFailed as exc:
            yield pb.GenerateResponse(
                request_id=rid,
                finish_reason=pb.FINISH_REASON_ERROR,
                error=f"KV transfer failed and --kv-failure-policy is fail: {exc}",
                kv_transfer=info,
            )
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def _responses(
        self,
        rid: str,
        deltas: AsyncIterator[SequenceDelta],
        info: pb.KVTransferInfo,
        start: float,
        handed_off: bool,
        params,
    ) -> AsyncIterator[pb.GenerateResponse]:
        first = True
        last: dict[int, float] = {}  # sample -> time of its previous token
        num_out: dict[int, int] = {}
        open_samples = params.n
        timing = None  # sample 0's, for the request-level histograms
        async for delta in deltas:
            now = time.monotonic()
            i = delta.index
            msg = pb.GenerateResponse(
                request_id=rid,
                index=i,
                token_ids=list(delta.token_ids),
                text=delta.text,
                finish_reason=finish_to_proto(delta.finish_reason),
            )
            if delta.logprobs:
                msg.logprobs.extend(logprobs_to_proto(lp) for lp in delta.logprobs)
            if first:
                msg.kv_transfer.CopyFrom(info)
                self.metrics.first_token(now - start)
                if delta.prompt_logprobs and not handed_off:
                    msg.prompt_logprobs.extend(
                        logprobs_to_proto(lp) for lp in delta.prompt_logprobs
                    )
            elif i in last:
                self.metrics.token_gap(now - last[i])
            num_out[i] = num_out.get(i, 0) + len(delta.token_ids)
            if delta.finished:
                if isinstance(delta.stop_reason, str):
                    msg.stop_str = delta.stop_reason
                # cached_tokens: the prompt tokens this pod did not compute; with a hand-off
                # that is the router's business (it has the prefill pod's count).
                msg.usage.CopyFrom(
                    pb.Usage(
                        prompt_tokens=delta.num_prompt_tokens,
                        completion_tokens=num_out[i],
                        cached_tokens=0 if handed_off else delta.num_cached_tokens,
                    )
                )
                self.metrics.sample_finished(num_out[i], delta.timing)
                if i == 0:
                    timing = delta.timing
                    _trace_sample(delta.timing, now, num_out[i])
                open_samples -= 1
                if not open_samples:
                    log.info(
                        "decode %s: %s tokens in %.1f ms (%s)%s", rid,
                        "+".join(str(num_out.get(k, 0)) for k in range(params.n)),
                        (now - start) * 1e3, delta.finish_reason,
                        f", KV by {info.transport}" if handed_off else "",
                    )  # fmt: skip
                    self.metrics.request_finished(
                        FinishedRequest(
                            finish_reason=delta.finish_reason or "stop",
                            num_prompt_tokens=delta.num_prompt_tokens,
                            # each prompt token is counted once in a pair: by the pod that
                            # computed it (docs: services/common/metrics.py)
                            counted_prompt_tokens=0 if handed_off else delta.num_prompt_tokens,
                            output_tokens=tuple(num_out.get(k, 0) for k in range(params.n)),
                            e2e=now - start,
                            max_tokens=params.max_tokens,
                            timing=timing,
                        )
                    )
            first = False
            last[i] = now
            yield msg


def _trace_sample(t: RequestTiming | None, done: float, tokens: int) -> None:
    """Sample 0's queue, first-token and stream spans from the engine's timing (to ``done``)."""
    if t is None or not tracing.enabled():
        return
    scheduled = done - t.inference
    first = scheduled + t.prefill
    tracing.record_interval("decode.queue", scheduled - t.queued, scheduled)
    tracing.record_interval("decode.first_token", scheduled, first)
    tracing.record_interval(
        "decode.stream", first, done,
        {"splitserve.output_tokens": tokens, "splitserve.preemptions": t.num_preemptions},
    )  # fmt: skip


def _without_prompt_logprobs(params):
    import dataclasses

    return dataclasses.replace(params, prompt_logprobs=None)
