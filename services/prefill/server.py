"""The prefill server: runs prompts, samples the first token, leases the prompt's KV blocks.

gRPC services: PrefillService (this module), KVService (reads of leased blocks, from
``splitserve.kvtransfer``), EngineService (stats, KV events) and grpc health.
A lease ends on release by the decode pod, on expiry, or on abort; each frees the blocks once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.kvtransfer.source import KVBlockSource
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.wire import logprobs_to_proto, params_from_proto
from splitserve.services.common.metrics import EngineMetrics

log = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        source: KVBlockSource,
        metrics: EngineMetrics,
    ) -> None:
        self.engine = engine
        self.source = source
        self.metrics = metrics

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        if request.protocol_version and request.protocol_version != pb.PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol_version {request.protocol_version} != {pb.PROTOCOL_VERSION}",
            )
        try:
            params = params_from_proto(request.sampling_params, request.extra_keys)
            if params.n != 1:
                raise ValueError("n must be 1 per prefill request (the router fans samples out)")
            # Only the first token is sampled here; stop strings are the decode side's job.
            first = dataclasses.replace(
                params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=()
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rid = request.request_id
        start = time.monotonic()
        final = None
        try:
            async for delta in self.engine.generate(
                rid, list(request.prompt_token_ids), first, hold_kv=True
            ):
                final = delta
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        assert final is not None and final.finished
        held = final.held_block_ids or ()
        response = pb.PrefillResponse(
            first_token_id=final.token_ids[0],
            num_cached_tokens=final.num_cached_tokens,
            num_prompt_tokens=final.num_prompt_tokens,
        )
        if final.logprobs:
            response.first_logprobs.CopyFrom(logprobs_to_proto(final.logprobs[0]))
        if final.prompt_logprobs:
            response.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in final.prompt_logprobs)
        ended = final.finish_reason == "stop" or params.max_tokens == 1
        if ended:
            response.finish_reason = (
                pb.FINISH_REASON_STOP if final.finish_reason == "stop" else pb.FINISH_REASON_LENGTH
            )
        self.metrics.finished(
            "prefill",
            final.num_prompt_tokens,
            1,
            time.monotonic() - start,
            time.monotonic() - start,
        )
        if ended or not held:
            await self.engine.call(self.engine.core.release_kv, rid)
            return response
        try:
            handoff = await asyncio.to_thread(
                self.source.grant, rid, list(held), final.num_prompt_tokens
            )
        except BaseException:
            # Never strand blocks: whatever failed, give them back.
            self.engine.submit(lambda: self.engine.core.release_kv(rid))
            raise
        response.handoff.CopyFrom(handoff)
        return response
