"""The decode server: pulls a prompt's KV from a prefill pod, then streams generated tokens.

Colocated pods (``--colocated``) also accept requests without a hand-off and run the prompt
themselves. A failed pull never hangs and never yields wrong tokens: with the ``recompute`` policy
the prompt is recomputed here (same greedy output), with ``fail`` the stream ends with an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from splitserve.engine.async_engine import AsyncEngine, EngineDeadError
from splitserve.engine.outputs import SequenceDelta
from splitserve.kvtransfer.errors import KVTransferError
from splitserve.kvtransfer.puller import KVPuller
from splitserve.proto import splitserve_pb2 as pb
from splitserve.proto import splitserve_pb2_grpc as pb_grpc
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import (
    finish_to_proto,
    logprobs_from_proto,
    logprobs_to_proto,
    params_from_proto,
)
from splitserve.services.common.metrics import EngineMetrics

log = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        puller: KVPuller,
        metrics: EngineMetrics,
        failure_policy: str = "recompute",
        colocated: bool = False,
        transfer_timeout: float = 10.0,
    ) -> None:
        if failure_policy not in ("recompute", "fail"):
            raise ValueError(f"kv failure policy must be recompute or fail, got {failure_policy!r}")
        self.engine = engine
        self.puller = puller
        self.metrics = metrics
        self.failure_policy = failure_policy
        self.colocated = colocated
        self.transfer_timeout = transfer_timeout

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        n = 0
        for rid in request.request_ids:
            n += bool(await self.engine.abort(rid))
        return pb.AbortResponse(num_aborted=n)

    async def Generate(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = request.request
        rid = req.request_id
        try:
            params = params_from_proto(req.sampling_params, req.extra_keys)
            if not req.prompt_token_ids:
                raise ValueError("prompt must not be empty")
            if request.HasField("prefill"):
                self.engine.core.validate(list(req.prompt_token_ids), params)
                if params.n != 1:
                    raise ValueError("n must be 1 for a request with a prefill hand-off")
            elif not self.colocated:
                raise ValueError("this decode pod is not colocated: a prefill hand-off is required")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        start = time.monotonic()
        info = pb.KVTransferInfo()
        try:
            if request.HasField("prefill"):
                # Prompt logprobs came with the hand-off: asking again would only cost this pod
                # its prefix-cache hits (such requests bypass the cache).
                local = dataclasses.replace(params, prompt_logprobs=None)
                deltas = self._import(rid, list(req.prompt_token_ids), local, request.prefill, info)
            else:
                deltas = self.engine.generate(rid, list(req.prompt_token_ids), params)
            prefill = request.prefill if request.HasField("prefill") else None
            async for message in self._responses(rid, deltas, info, start, prefill):
                yield message
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _TransferFailed as exc:
            yield pb.GenerateResponse(
                request_id=rid,
                finish_reason=pb.FINISH_REASON_ERROR,
                error=f"KV transfer failed and --kv-failure-policy is fail: {exc}",
                kv_transfer=info,
            )
        except EngineDeadError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    async def _import(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        prefill: pb.PrefillResponse,
        info: pb.KVTransferInfo,
    ) -> AsyncIterator[SequenceDelta]:
        stream = self.engine.open_stream(rid)
        try:
            delta = await self._start_import(rid, prompt, params, prefill, info)
        except BaseException:
            # Client gone or failure before the request joined the batch: drop the reservation
            # and let the prefill pod free its blocks now rather than at lease expiry.
            self.engine.close_stream(rid)
            self.engine.submit(lambda: self.engine.core.abort_request(rid))
            if prefill.handoff.lease_id:
                self._release_later(prefill.handoff)
            raise
        self.engine.deliver(delta)
        async for delta in self.engine.iterate(rid, stream):
            yield delta

    async def _start_import(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        prefill: pb.PrefillResponse,
        info: pb.KVTransferInfo,
    ) -> SequenceDelta:
        """Reserve local blocks, pull the missing ones, and hand the request to the engine.

        Returns the first token's delta (the prefill pod's sampled token, detokenized here).
        """
        core = self.engine.core
        first = prefill.first_token_id
        first_lp = (
            logprobs_from_proto(prefill.first_logprobs)
            if prefill.HasField("first_logprobs")
            else None
        )
        handoff = prefill.handoff
        reservation = await self.engine.call(core.reserve_import, rid, prompt, params)
        if reservation is None:
            if handoff.lease_id:
                self._release_later(handoff)
            return await self._recompute(rid, prompt, params, first, first_lp, "pool full", info)
        if prefill.finish_reason or not handoff.block_ids:
            # The first token already ended the request: nothing to pull.
            if handoff.lease_id:
                self._release_later(handoff)
            return await self.engine.call(core.commit_import, rid, first, first_lp)
        # Blocks this pod already holds in its own prefix cache are not transferred.
        skip = reservation.first_block
        sub = pb.KVHandoff()
        sub.CopyFrom(handoff)
        del sub.block_ids[:skip]
        del sub.block_checksums[:skip]
        if not sub.block_ids:
            self._release_later(handoff)
            return await self.engine.call(core.commit_import, rid, first, first_lp)
        try:
            result = await asyncio.to_thread(
                self.puller.pull, sub, list(reservation.block_ids), self.transfer_timeout
            )
        except KVTransferError as exc:
            reason = f"{exc.reason}: {exc}"
            log.warning("request %s: KV pull failed (%s)", rid, reason)
            if self.failure_policy == "fail":
                await self.engine.call(core.cancel_import, rid)
            return await self._recompute(rid, prompt, params, first, first_lp, reason, info)
        info.transport = result.transport
        info.num_bytes = result.num_bytes
        info.num_blocks = result.num_blocks
        info.seconds = result.seconds
        return await self.engine.call(core.commit_import, rid, first, first_lp)

    async def _recompute(self, rid, prompt, params, first, first_lp, reason, info) -> SequenceDelta:
        info.recomputed = self.failure_policy == "recompute"
        info.failure_reason = reason
        if self.failure_policy == "fail":
            raise _TransferFailed(reason)
        core = self.engine.core
        return await self.engine.call(core.recompute_import, rid, prompt, params, first, first_lp)

    def _release_later(self, handoff: pb.KVHandoff) -> None:
        asyncio.get_running_loop().run_in_executor(None, self.puller.release, handoff)

    async def _responses(
        self,
        rid: str,
        deltas: AsyncIterator[SequenceDelta],
        info: pb.KVTransferInfo,
        start: float,
        prefill: pb.PrefillResponse | None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        first = True
        last = start
        ttft = None
        num_out = 0
        async for delta in deltas:
            now = time.monotonic()
            msg = pb.GenerateResponse(
                request_id=rid,
                token_ids=list(delta.token_ids),
                text=delta.text,
                finish_reason=finish_to_proto(delta.finish_reason),
            )
            if delta.logprobs:
                msg.logprobs.extend(logprobs_to_proto(lp) for lp in delta.logprobs)
            if first:
                msg.kv_transfer.CopyFrom(info)
                ttft = now - start
                if prefill is not None:
                    msg.prompt_logprobs.extend(prefill.prompt_logprobs)
                elif delta.prompt_logprobs:
                    msg.prompt_logprobs.extend(
                        logprobs_to_proto(lp) for lp in delta.prompt_logprobs
                    )
            else:
                self.metrics.token_gap(now - last)
            num_out += len(delta.token_ids)
            if delta.finished:
                if isinstance(delta.stop_reason, str):
                    msg.stop_str = delta.stop_reason
                # With a hand-off the prompt's cache hits happened on the prefill pod.
                cached = delta.num_cached_tokens if prefill is None else prefill.num_cached_tokens
                msg.usage.CopyFrom(
                    pb.Usage(
                        prompt_tokens=delta.num_prompt_tokens,
                        completion_tokens=num_out,
                        cached_tokens=cached,
                    )
                )
                self.metrics.finished(
                    delta.finish_reason or "stop", delta.num_prompt_tokens, num_out,
                    ttft, now - start,
                )  # fmt: skip
            first = False
            last = now
            yield msg


class _TransferFailed(Exception):
    pass
