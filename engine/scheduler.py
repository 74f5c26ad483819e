"""Continuous batching: each step picks which requests compute how many tokens.

One rule drives everything: every request has ``num_computed_tokens`` catching up to
``num_tokens`` within the step's token budget (``max_num_batched_tokens``). Running requests go
first (decodes need one token each; a chunked prefill takes what budget is left), then waiting
requests are admitted while budget, sequence slots and KV blocks last. When blocks run out, the
newest running request is preempted: its blocks are freed and it goes back to the front of the
queue to be recomputed later (prefix caching usually makes that cheap).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.config import SchedulerConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """True when this step catches the request up, so its last position gets sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) COW copies

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, max_loras: int | None = None
    ) -> None:
        self.config = config
        self.kv = kv
        # LoRA: at most this many distinct adapters in one step (the engine's resident slots)
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # --- queue management --------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        request.queued_at = time.monotonic()
        self.waiting.append(request)

    def expire_waiting(self, now: float) -> list[Request]:
        """Remove and return the waiting requests queued longer than ``max_queue_seconds``.

        Only requests that never ran: a preempted one was accepted and partly served already.
        """
        limit = self.config.max_queue_seconds
        if limit is None or not self.waiting:
            return []
        expired = [
            r
            for r in self.waiting
            if r.status is RequestStatus.WAITING and now - r.queued_at > limit
        ]
        for req in expired:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return expired

    def add_running(self, request: Request) -> None:
        """A forked sibling that already owns (shared) blocks joins the running batch."""
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_at is None:  # an imported prompt joins here
            request.first_scheduled_at = time.monotonic()
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request for good and free its blocks at once."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request)
        self.kv.free(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # --- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        step_loras: set = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._lora_fits(req, step_loras):  # (only imports can overfill the batch)
                i += 1
                continue
            remaining = req.num_tokens - req.num_computed_tokens
            num_new = min(remaining, budget)
            if num_new < remaining and not chunked:
                i += 1
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1

        # Admitting new work right after preempting would only thrash the pool.
        running_loras = {r.lora for r in self.running if r.lora} if self.max_loras else set()
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            req = self.waiting[0]
            if not self._lora_fits(req, running_loras):  # FIFO: it waits for an adapter slot
                break
            hit = self.kv.find_cached_prefix(req)
            num_new = req.num_tokens - hit.num_tokens(self.kv.block_size)
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            if not self.kv.allocate(req, num_new, hit):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_at is None:
                req.first_scheduled_at = time.monotonic()
            self.running.append(req)
            scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new

        copies, self.kv.pending_copies = self.kv.pending_copies, []
        return SchedulerOutput(scheduled, preempted, copies)

    def _lora_fits(self, req: Request, loras: set) -> bool:
        """Whether ``req``'s adapter fits beside ``loras`` (max_loras distinct); adds it."""
        if req.lora is None or self.max_loras is None or req.lora in loras:
            return True
        if len(loras) >= self.max_loras:
            return False
        loras.add(req.lora)
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Advance every scheduled request's computed count and cache its new full blocks."""
        for item in output.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
            self.kv.cache_computed_blocks(item.request)
