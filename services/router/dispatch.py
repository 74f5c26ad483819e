"""One request's trip through the pools: pick pods, prefill, decode, retry, abort.

Disaggregated: ``Prefill`` on a prefill pod (chosen by prefix match and load), then
``Generate(request, prefill)`` on a decode pod with the same compatibility hash, which pulls the KV
and streams every token (the first one included). Colocated pods get ``Generate(request)`` alone.

Retries: a pod-level failure (``BackendError.retryable``) is retried on another pod while the
request's attempts and the router's retry budget allow. A stream retries only before its first
token reached the client; ``complete`` (non-streaming) may restart at any point, since the client
has seen nothing yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.block_hash import hash_prompt_blocks
from splitserve.protocol.constants import PROTOCOL_VERSION
from splitserve.protocol.sampling import SamplingParams
from splitserve.protocol.wire import params_to_proto
from splitserve.services.router.errors import APIError, BackendError, NoBackendError
from splitserve.services.router.metrics import RouterMetrics
from splitserve.services.router.policy import Weights, choose
from splitserve.services.router.pool import DECODE, PREFILL, PodState, Pool, track_inflight
from splitserve.services.router.retry import RetryBudget

log = logging.getLogger(__name__)

@dataclass
class EngineRequest:
    """One sample of one API request, as the pods see it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1; the seed already offset for this sample
    session_key: str | None = None
    _hashes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_size: int) -> list[int]:
        hashes = self._hashes.get(block_size)
        if hashes is None:
            hashes = hash_prompt_blocks(self.prompt_token_ids, block_size, self.params.extra_keys)
            self._hashes[block_size] = hashes
        return hashes

    @cached_property
    def proto(self) -> pb.PrefillRequest:
        return pb.PrefillRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=params_to_proto(self.params),
            extra_keys=list(self.params.extra_keys),
            protocol_version=PROTOCOL_VERSION,
        )


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
        self.retries_total = 0

    # ---- choosing pods -------------------------------------------------------------------------

    def route(self, req: EngineRequest, exclude: Sequence[str] = ()) -> Route:
        """Choose the prefill-capable pod by policy, then a compatible decode pod by load.

        Pods that failed this request (``exclude``) are skipped while others remain. A prefill pod
        with no ready decode pod of its compatibility hash is not a candidate (mid-rollout, old
        and new pods coexist; a request never crosses versions).
        """
        decodes = _prefer_others(self.pool.ready(DECODE), exclude)
        first = [
            p
            for p in _prefer_others(self.pool.ready(PREFILL), exclude)
            if p.endpoint.colocated
            or any(_compatible(p.endpoint.compat_hash, d.endpoint.compat_hash) for d in decodes)
        ]
        if not first:
            raise NoBackendError("no ready prefill pod with a compatible decode pod")
        block_size = first[0].block_size
        hashes = req.block_hashes(block_size)
        ids = [p.endpoint.pod_id for p in first]
        matched = self.pool.index.match(hashes, ids)
        cands = [p.candidate(matched[p.endpoint.pod_id]) for p in first]
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
        decodes = [
            p for p in decodes if _compatible(pre.endpoint.compat_hash, p.endpoint.compat_hash)
        ]
        policy = "round_robin" if self.policy == "round_robin" else "least_load"
        d = choose(
            policy,
            [p.candidate(0) for p in decodes],
            total_blocks=0,
            weights=self.weights,
            counter=next(self._decode_counter),
        )
        return Route(pre, self.pool.pods[d.pod_id], choice.matched_blocks)

    # ---- one attempt ---------------------------------------------------------------------------

    async def _attempt(
        self, req: EngineRequest, route: Route
    ) -> AsyncIterator[pb.GenerateResponse]:
        first_pod = route.prefill or route.decode
        self.pool.index.record_routed(
            first_pod.endpoint.pod_id, req.block_hashes(first_pod.block_size)
        )
        if self.metrics is not None:
            m = self.metrics
            m.matched_tokens.inc(route.matched_blocks * first_pod.block_size)
            if route.prefill is not None:
                m.routed.labels(route.prefill.endpoint.address, PREFILL).inc()
            m.routed.labels(route.decode.endpoint.address, DECODE).inc()
        gen = pb.GenerateRequest(request=req.proto, protocol_version=PROTOCOL_VERSION)
        if route.prefill is not None:
            with track_inflight(route.prefill):
                prefill = await route.prefill.client.prefill(req.proto, self.prefill_timeout_s)
            gen.prefill.CopyFrom(prefill)
        client = route.decode.client
        call = client.generate(gen)
        finished = False
        try:
            with track_inflight(route.decode):
                stream = client.iterate(call).__aiter__()
                while True:
                    try:
                        msg = await asyncio.wait_for(
                            stream.__anext__(), timeout=self.stream_idle_timeout_s
                        )
                    except StopAsyncIteration:
                        break
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
                    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        finished = True
                    yield msg
                if not finished:
                    raise BackendError(
                        f"{client.address}: stream ended without a finish reason",
                        retryable=True,
                        pod=client.address,
                    )
        finally:
            if not finished:
                # Client gone, or the pod failed: stop the work there (best effort).
                call.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.abort([req.request_id]))

    # ---- public --------------------------------------------------------------------------------

    async def stream(self, req: EngineRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Messages for one sample; retried on another pod until the first token is out."""
        self.budget.on_request()
        failed: list[str] = []
        attempt = 1
        while True:
            route = self.route(req, exclude=failed)
            sent = False
            try:
                async for msg in self._attempt(req, route):
                    sent = sent or bool(msg.token_ids) or bool(msg.text)
                    yield msg
                return
            except BackendError as err:
                if err.pod and err.retryable:
                    self.pool.mark_failed(err.pod)
                    failed.append(err.pod)
                attempt += 1
                if sent or not err.retryable or not self.budget.try_retry(attempt):
                    raise
                self.retries_total += 1
                if self.metrics is not None:
                    self.metrics.retries.inc()
                log.warning("retrying %s after: %s", req.request_id, err)

    async def complete(self, req: EngineRequest) -> list[pb.GenerateResponse]:
        """All messages of one sample; any pod failure restarts it elsewhere (nothing was sent)."""
        self.budget.on_request()
        failed: list[str] = []
        attempt = 1
        while True:
            route = self.route(req, exclude=failed)
            try:
                return [msg async for msg in self._attempt(req, route)]
            except BackendError as err:
                if err.pod and err.retryable:
                    self.pool.mark_failed(err.pod)
                    failed.append(err.pod)
                attempt += 1
                if not err.retryable or not self.budget.try_retry(attempt):
                    raise
                self.retries_total += 1
                if self.metrics is not None:
                    self.metrics.retries.inc()
                log.warning("retrying %s after: %s", req.request_id, err)


def _prefer_others(pods: list[PodState], exclude: Sequence[str]) -> list[PodState]:
    """Pods not in ``exclude``; all of them when every one has failed once (try again)."""
    others = [p for p in pods if p.endpoint.pod_id not in exclude]
    return others or pods


def _compatible(a: str, b: str) -> bool:
    """Equal compatibility hashes; unknown ("" in local mode) pairs with anything."""
    return not a or not b or a == b


def backend_error_to_api(err: BackendError) -> APIError:
    if err.http_status == 400:
        return APIError(400, str(err), code="invalid_request")
    return APIError(502 if err.http_status == 502 else err.http_status, f"backend failed: {err}")
