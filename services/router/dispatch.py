"""One request's trip through the pools: pick pods, prefill, decode, retry, abort.

Disaggregated: ``Prefill`` on a prefill pod (chosen by prefix match and load), then
``Generate(request, prefill)`` on a decode pod that pairs with it (same KV compatibility hash and
tokenizer, as the engines report them, and the same rollout label), which pulls the KV once and
streams every token of every one of the request's n samples (the first ones included).
Colocated pods get ``Generate(request)`` alone.

Retries: a pod-level failure (``BackendError.retryable``) is retried on another pod while the
request's attempts and the router's retry budget allow. A stream retries only before its first
token reached the client; ``complete`` (non-streaming) may restart at any point, since the client
has seen nothing yet.

Cancellation: an attempt that ends without its finish (client gone, pod failure) cancels the
decode stream, aborts the request on the decode pod and, when one ran the prompt, on the prefill
pod too, which releases a lease no decode pod took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from splitserve.observability import tracing
from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.block_hash import hash_prompt_blocks
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.lora import AdapterInfo, with_adapter_key
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import params_to_proto
from splitserve.services.router.adapters import serves
from splitserve.services.router.errors import APIError, BackendError, NoBackendError
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.policy import Weights, choose
from splitserve.services.router.pool import DECODE, PREFILL, PodState, Pool, track_inflight
from splitserve.services.router.retry import RetryBudget

log = logging.getLogger(__name__)


@dataclass
class EngineRequest:
    """One prompt of one API request, with all its samples, as the pods see it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # params.n samples; sample i uses seed + i
    tokenizer_id: str  # the generation of engines whose tokenizer made prompt_token_ids
    session_key: str | None = None
    adapter: AdapterInfo | None = None  # the LoRA adapter `model` named (None: base model)
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_size: int) -> list[int]:
        """The engines' own block hashes: extra keys, then the adapter's cache key."""
        hashes = self._hashes.get(block_size)
        if hashes is None:
            keys = with_adapter_key(self.params.extra_keys, self.adapter)
            hashes = hash_prompt_blocks(self.prompt_token_ids, block_size, keys)
            self._hashes[block_size] = hashes
        return hashes

    @cached_property
    def proto(self) -> pb.PrefillRequest:
        msg = pb.PrefillRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=params_to_proto(self.params),
            extra_keys=list(self.params.extra_keys),
            protocol_version=PROTOCOL_VERSION,
        )
        if self.adapter is not None:  # both pods check they have these very files loaded
            msg.lora.name, msg.lora.digest = self.adapter.name, self.adapter.digest
        return msg

    def attempt(self, n: int) -> pb.PrefillRequest:
        """The message of attempt ``n``: a retry gets its own id, so it can never collide with
        the cancelled attempt a pod may still be winding down."""
        if n == 1:
            return self.proto
        msg = pb.PrefillRequest()
        msg.CopyFrom(self.proto)
        msg.request_id = f"{self.request_id}.{n}"
        return msg


@dataclass(frozen=True)
class Route:
    prefill: PodState | None  # None: colocated, the decode pod runs the prompt
    decode: PodState
    matched_blocks: int


class Dispatcher:
    """Routes requests over a ``Pool`` with one policy and one retry budget."""

    def __init__(
        self,
        pool: Pool,
        *,
        policy: str = "prefix",
        weights: Weights | None = None,
        budget: RetryBudget,
        prefill_timeout_s: float = 120.0,
        stream_idle_timeout_s: float = 120.0,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.policy = policy
        self.weights = weights or Weights()
        self.budget = budget
        self.prefill_timeout_s = prefill_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._counter = itertools.count()
        self._decode_counter = itertools.count()

    # ---- choosing pods -------------------------------------------------------------------------

    def usable_tokenizers(self) -> set[str]:
        """Tokenizer ids of the generations that can serve now (a ready prefill-capable pod with
        a ready decode pod it pairs with, or a ready colocated pod)."""
        decodes = self.pool.ready(DECODE)
        out = set()
        for p in self.pool.ready(PREFILL):
            if p.endpoint.colocated or any(p.pairs_with(d) for d in decodes):
                out.add(p.tokenizer_id)
        return out

    def route(self, req: EngineRequest, exclude: Sequence[str] = ()) -> Route:
        """Choose the prefill-capable pod by policy, then a decode pod that pairs with it by load.

        Only pods of the request's tokenizer generation are candidates. Pods that failed this
        request (``exclude``) are skipped while others remain. A prefill pod with no ready decode
        pod to pair with is not a candidate (mid-rollout, old and new pods coexist; a request
        never crosses versions).
        """
        mine, adapter = req.tokenizer_id, req.adapter
        decodes = [p for p in _prefer_others(self.pool.ready(DECODE), exclude)
                   if p.tokenizer_id == mine and serves(p, adapter)]  # fmt: skip
        first = [
            p
            for p in _prefer_others(self.pool.ready(PREFILL), exclude)
            if p.tokenizer_id == mine
            and serves(p, adapter)
            and (p.endpoint.colocated or any(p.pairs_with(d) for d in decodes))
        ]
        if not first:
            raise NoBackendError(
                "no ready prefill pod with a decode pod to pair with"
                + (f" that both have LoRA adapter {adapter.name!r}" if adapter else "")
            )
        block_size = first[0].block_size
        hashes = req.block_hashes(block_size)
        ids = [p.endpoint.pod_id for p in first]
        matched = self.pool.index.match(hashes, ids)
        cands = [p.candidate(matched[p.endpoint.pod_id], adapter) for p in first]
        choice = choose(
            self.policy,
            cands,
            total_blocks=len(hashes),
            weights=self.weights,
            counter=next(self._counter),
            session_key=req.session_key,
        )
        pre = self.pool.pods[choice.pod_id]
        if pre.endpoint.colocated:
            return Route(None, pre, choice.matched_blocks)
        decodes = [p for p in decodes if pre.pairs_with(p)]
        policy = "round_robin" if self.policy == "round_robin" else "least_load"
        d = choose(
            policy,
            [p.candidate(0, adapter) for p in decodes],
            total_blocks=0,
            weights=self.weights,
            counter=next(self._decode_counter),
        )
        return Route(pre, self.pool.pods[d.pod_id], choice.matched_blocks)

    # ---- one attempt ---------------------------------------------------------------------------

    def _record(self, req: EngineRequest, route: Route) -> None:
        first_pod = route.prefill or route.decode
        self.pool.index.record_routed(
            first_pod.endpoint.pod_id, req.block_hashes(first_pod.block_size)
        )
        if self.metrics is not None:
            m = self.metrics
            m.matched_tokens.inc(route.matched_blocks * first_pod.block_size)
            m.routing_decisions.labels(
                self.policy,
                "colocated" if route.prefill is None else "disaggregated",
                "hit" if route.matched_blocks else "miss",
            ).inc()
            if route.prefill is not None:
                m.routed.labels(route.prefill.endpoint.address, PREFILL).inc()
            m.routed.labels(route.decode.endpoint.address, DECODE).inc()

    def _choose(self, req: EngineRequest, exclude: Sequence[str], attempt: int) -> Route:
        """``route``, in a trace span of the decision when tracing."""
        if not tracing.enabled():
            return self.route(req, exclude)
        with tracing.span("route") as s:
            route = self.route(req, exclude)
            first = route.prefill or route.decode
            tracing.set_attributes(s, {
                "splitserve.policy": self.policy,
                "splitserve.attempt": attempt,
                "splitserve.prefill_pod": route.prefill.endpoint.address if route.prefill else None,
                "splitserve.decode_pod": route.decode.endpoint.address,
                "splitserve.prompt_tokens": len(req.prompt_token_ids),
                "splitserve.matched_tokens": route.matched_blocks * first.block_size,
            })  # fmt: skip
        return route

    async def _attempt(
        self, req: EngineRequest, route: Route, attempt: int
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The request's messages from one route; raises BackendError if the route failed."""
        self._record(req, route)
        message = req.attempt(attempt)
        rid = message.request_id
        gen = pb.GenerateRequest(request=message, protocol_version=PROTOCOL_VERSION)
        prefill: pb.PrefillResponse | None = None
        client = route.decode.client
        call = None
        remaining = req.params.n  # samples whose finish has not arrived
        span = None  # the decode call's (never current: this generator yields inside it)
        try:
            if route.prefill is not None:
                with (
                    track_inflight(route.prefill),
                    tracing.span("prefill", {"splitserve.pod": route.prefill.endpoint.address}),
                ):
                    prefill = await route.prefill.client.prefill(message, self.prefill_timeout_s)
                gen.prefill.CopyFrom(prefill)
                del gen.prefill.prompt_logprobs[:]  # the router keeps those; decode needs none
            span = tracing.start_span("decode", {"splitserve.pod": client.address})
            call = client.generate(gen, span)
            with track_inflight(route.decode):
                stream = client.iterate(call).__aiter__()
                first = True
                while remaining:
                    try:
                        msg = await asyncio.wait_for(
                            stream.__anext__(), timeout=self.stream_idle_timeout_s
                        )
                    except StopAsyncIteration:
                        raise BackendError(
                            f"{client.address}: stream ended without a finish reason",
                            retryable=True,
                            pod=client.address,
                        ) from None
                    except TimeoutError as err:
                        raise BackendError(
                            f"{client.address}: no token for {self.stream_idle_timeout_s:.0f} s",
                            retryable=True,
                            pod=client.address,
                        ) from err
                    if msg.finish_reason == pb.FINISH_REASON_ERROR:
                        raise BackendError(
                            f"{client.address}: {msg.error or 'engine error'}",
                            retryable=True,
                            pod=client.address,
                        )
                    if first and prefill is not None:
                        _adopt_prefill_facts(msg, prefill)
                    if first:
                        tracing.add_event(span, "first message")
                    first = False
                    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        remaining -= 1
                        if prefill is not None and msg.HasField("usage"):
                            msg.usage.cached_tokens = prefill.num_cached_tokens
                    yield msg
        finally:
            try:
                if remaining:
                    tracing.set_error(span, "ended before its finish")
                    await asyncio.shield(self._stop(rid, route, call))
            finally:  # a cancelled client re-raises in the shield's await: end it anyway
                tracing.end_span(span)

    async def _stop(self, rid: str, route: Route, call) -> None:
        """Stop the work on the pods (best effort): the client is gone or a pod failed."""
        if call is not None:
            call.cancel()
        jobs = []
        if call is not None:
            jobs.append(route.decode.client.abort([rid]))
        if route.prefill is not None:
            # Still prefilling, or done with a lease no decode pod may ever take.
            jobs.append(route.prefill.client.abort_prefill([rid]))
        with contextlib.suppress(Exception):
            await asyncio.gather(*jobs, return_exceptions=True)

    # ---- public --------------------------------------------------------------------------------

    async def stream(self, req: EngineRequest) -> AsyncIterator[pb.GenerateResponse]:
        """The request's messages; retried on another pod until a first token is out."""
        self.budget.on_request()
        failed: list[str] = []
        attempt = 1
        while True:
            route = self._choose(req, failed, attempt)
            sent = False
            try:
                async for msg in self._attempt(req, route, attempt):
                    sent = sent or bool(msg.token_ids) or bool(msg.text)
                    yield msg
                return
            except BackendError as err:
                attempt += 1
                if not self._may_retry(req, err, failed, attempt, sent):
                    raise

    async def complete(self, req: EngineRequest) -> list[pb.GenerateResponse]:
        """All messages of the request; any pod failure restarts it elsewhere (nothing sent)."""
        self.budget.on_request()
        failed: list[str] = []
        attempt = 1
        while True:
            route = self._choose(req, failed, attempt)
            try:
                return [msg async for msg in self._attempt(req, route, attempt)]
            except BackendError as err:
                attempt += 1
                if not self._may_retry(req, err, failed, attempt, sent=False):
                    raise

    def _may_retry(
        self, req: EngineRequest, err: BackendError, failed: list[str], attempt: int, sent: bool
    ) -> bool:
        if err.pod and err.retryable:
            self.pool.mark_failed(err.pod)
            failed.append(err.pod)
        if sent or not err.retryable or not self.budget.try_retry(attempt):
            return False
        if self.metrics is not None:
            self.metrics.retries.inc()
        log.warning("retrying %s after: %s", req.request_id, err)
        return True


def _adopt_prefill_facts(msg: pb.GenerateResponse, prefill: pb.PrefillResponse) -> None:
    """What the client learns from the prefill pod, on the first message: prompt logprobs."""
    if prefill.prompt_logprobs:
        msg.prompt_logprobs.extend(prefill.prompt_logprobs)


def _prefer_others(pods: list[PodState], exclude: Sequence[str]) -> list[PodState]:
    """Pods not in ``exclude``; all of them when every one has failed once (try again)."""
    others = [p for p in pods if p.endpoint.pod_id not in exclude]
    return others or pods


def backend_error_to_api(err: BackendError) -> APIError:
    if err.http_status == 400:
        return APIError(400, str(err), code="invalid_request")
    if err.http_status == 503:
        return APIError(503, f"overloaded: {err}", code="overloaded", headers={"Retry-After": "1"})
    if err.http_status == 404:  # a LoRA adapter that left the pods while the request ran
        return APIError(404, str(err), param="model", code="model_not_found")
    return APIError(err.http_status, f"backend failed: {err}")
