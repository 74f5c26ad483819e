"""The decode side of a hand-off, owned by one object from reservation to lease release.

``KVConnector.stream`` reserves local blocks, pulls the prompt's missing blocks from the prefill
pod, then either commits them (the n samples continue after their first tokens, sharing the
imported blocks) or recomputes the prompt here (``--kv-failure-policy recompute``), or ends with
``KVImportFailed`` (``fail``). The prefill pod's lease is released exactly once, as soon as the
blocks are copied or given up, on every path: success, failure, cancellation.

A pull runs on a worker thread writing into the reserved blocks. It is never abandoned: if the
client goes away mid-pull, the connector waits for the pull to end (it is bounded by its
timeout) before the reservation is given back, so no block is reused while it is being written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from splitserve.engine.async_engine import AsyncEngine, FirstToken, KVImport
from splitserve.engine.outputs import SequenceDelta
from splitserve.kvtransfer.errors import KVTransferError
from splitserve.kvtransfer.puller import KVPuller
from splitserve.observability import tracing
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.constants import KV_FAILURE_POLICIES
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import finish_from_proto, logprobs_from_proto

log = logging.getLogger(__name__)


class KVImportFailed(Exception):
    """The KV could not be imported and the failure policy is ``fail``."""


class _Lease:
    """A prefill pod's lease on the blocks, released at most once (in the background)."""

    def __init__(self, puller: KVPuller, handoff: pb.KVHandoff | None) -> None:
        self._puller = puller
        self._handoff = handoff if handoff is not None and handoff.lease_id else None

    def release(self) -> None:
        handoff, self._handoff = self._handoff, None
        if handoff is not None:
            asyncio.get_running_loop().run_in_executor(None, self._puller.release, handoff)


class KVConnector:
    def __init__(
        self,
        engine: AsyncEngine,
        puller: KVPuller,
        failure_policy: str = "recompute",
        transfer_timeout: float = 10.0,
    ) -> None:
        if failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv failure policy must be recompute or fail, got {failure_policy!r}")
        self.engine = engine
        self.puller = puller
        self.failure_policy = failure_policy
        self.transfer_timeout = transfer_timeout

    async def stream(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        prefill: pb.PrefillResponse,
        info: pb.KVTransferInfo,
        lora_name: str | None = None,
    ) -> AsyncIterator[SequenceDelta]:
        """Import the prompt's KV and yield the samples' deltas, first tokens included.

        Raises ValueError on a bad request (before anything is reserved or yielded) and
        ``KVImportFailed`` when the KV could not be had under the ``fail`` policy. ``info`` is
        filled with how the KV arrived.
        """
        first = first_tokens(prefill)
        if len(first) != params.n:
            raise ValueError(f"the hand-off has {len(first)} first tokens for n={params.n}")
        handoff = prefill.handoff if prefill.HasField("handoff") else None
        lease = _Lease(self.puller, handoff)
        try:
            async with self.engine.kv_import(request_id, prompt, params, lora_name) as imp:
                pulled = await self._fill(imp, handoff, first, info)
                lease.release()  # the blocks are copied or given up: free them at the source
                deltas = imp.commit(first) if pulled else imp.recompute(first)
                async for delta in deltas:
                    yield delta
        finally:
            lease.release()

    async def _fill(
        self,
        imp: KVImport,
        handoff: pb.KVHandoff | None,
        first: Sequence[FirstToken],
        info: pb.KVTransferInfo,
    ) -> bool:
        """Copy the missing blocks into the reservation; False: recompute the prompt instead."""
        reservation = imp.reservation
        if reservation is None:
            return self._give_up(imp.request_id, "pool full", info)
        if all(t.finish_reason is not None for t in first) or handoff is None:
            return True  # every sample ended with its first token: nothing to pull
        # Blocks this pod already holds in its own prefix cache are not transferred.
        skip = reservation.first_block
        sub = pb.KVHandoff()
        sub.CopyFrom(handoff)
        del sub.block_ids[:skip]
        del sub.block_checksums[:skip]
        if not sub.block_ids:
            return True
        loop = asyncio.get_running_loop()
        pull = loop.run_in_executor(
            None, self.puller.pull, sub, list(reservation.block_ids), self.transfer_timeout, False
        )
        with tracing.span("kv.pull", {"splitserve.blocks": len(sub.block_ids)}) as span:
            try:
                result = await _uncancellable(pull)
            except KVTransferError as exc:
                log.warning("request %s: KV pull failed (%s: %s)", imp.request_id, exc.reason, exc)
                tracing.set_error(span, exc.reason)
                return self._give_up(imp.request_id, f"{exc.reason}: {exc}", info)
            tracing.set_attributes(span, {"splitserve.transport": result.transport,
                                          "splitserve.bytes": result.num_bytes})  # fmt: skip
        info.transport = result.transport
        info.num_bytes = result.num_bytes
        info.num_blocks = result.num_blocks
        info.seconds = result.seconds
        return True

    def _give_up(self, request_id: str, reason: str, info: pb.KVTransferInfo) -> bool:
        info.recomputed = self.failure_policy == "recompute"
        info.failure_reason = reason
        if self.failure_policy == "fail":
            raise KVImportFailed(reason)
        log.info("request %s: recomputing the prompt (%s)", request_id, reason)
        return False


def first_tokens(prefill: pb.PrefillResponse) -> list[FirstToken]:
    """The hand-off's first tokens, one per sample, as the engine takes them."""
    return [
        FirstToken(
            t.token_id,
            logprobs_from_proto(t.logprobs) if t.HasField("logprobs") else None,
            finish_from_proto(t.finish_reason),
        )
        for t in prefill.first_tokens
    ]


async def _uncancellable(fut: asyncio.Future):
    """``fut``'s result, awaited to its end even if the caller is cancelled meanwhile (then the
    cancellation is re-raised once ``fut`` is done)."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:  # noqa: BLE001 - fut failed: fut.result() below re-raises it
            break
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()
