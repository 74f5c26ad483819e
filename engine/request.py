"""A request (one output sequence) as the scheduler and the engine track it."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from splitserve.engine.logprobs import TokenLogprobs
from splitserve.protocol.block_hash import hash_block_tokens
from splitserve.protocol.lora import AdapterInfo
from splitserve.protocol.sampling import SamplingParams

if TYPE_CHECKING:
    from splitserve.engine.structured_output import SequenceGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """One sequence: its tokens, how many of them have KV in the cache, and its sampling state.

    The scheduler's one rule: ``num_computed_tokens`` catches up to ``num_tokens``. A fresh prompt,
    a chunked prefill, a prefix-cache hit, a resumed (preempted) request and a decode step are all
    just different gaps between the two.

    A request with ``n > 1`` starts as one sequence (``sample_index == 0``); when its prompt is done
    the engine forks siblings that share its KV blocks copy-on-write.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        block_size: int,
        *,
        sample_index: int = 0,
        group_id: str | None = None,
        arrival_time: float | None = None,
        prompt: str | None = None,
        lora: AdapterInfo | None = None,
    ) -> None:
        self.request_id = request_id
        # The LoRA adapter it runs with; its cache key is already in params.extra_keys.
        self.lora = lora
        self.group_id = group_id or request_id
        self.sample_index = sample_index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.block_size = block_size
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.queued_at = self.arrival_time  # when it last entered the waiting queue
        self.first_scheduled_at: float | None = None  # (metrics: vLLM's queue/prefill split)
        self.first_token_at: float | None = None
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache; -1 until known
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.block_hashes: list[int] = []
        # params.prompt_logprobs: one entry per prompt position after the first (the logprob of
        # that prompt token given the ones before it), filled chunk by chunk during prefill.
        self.prompt_logprobs: list[TokenLogprobs] = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + sample_index)
        # Set by the engine iff params.structured_output: where the output is in its grammar.
        self.grammar: SequenceGrammar | None = None
        self._update_block_hashes()

    # --- token bookkeeping ---------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        self._update_block_hashes()

    def _update_block_hashes(self) -> None:
        """Extend the chained hashes to every full block of ``all_token_ids``."""
        bs = self.block_size
        extra = self.params.extra_keys
        while (len(self.block_hashes) + 1) * bs <= len(self.all_token_ids):
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(
                hash_block_tokens(parent, self.all_token_ids[i * bs : (i + 1) * bs], extra)
            )

    def fork(self, request_id: str, sample_index: int) -> Request:
        """A sibling sample of the same prompt at the same point (the caller shares the blocks)."""
        child = Request(
            request_id,
            self.prompt_token_ids,
            self.params,
            self.block_size,
            sample_index=sample_index,
            group_id=self.group_id,
            arrival_time=self.arrival_time,
            prompt=self.prompt,
            lora=self.lora,
        )
        child.all_token_ids = list(self.all_token_ids)
        child.block_hashes = list(self.block_hashes)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.first_scheduled_at = self.first_scheduled_at
        child.first_token_at = self.first_token_at
        child.status = self.status
        child.grammar = None if self.grammar is None else self.grammar.fork()
        return child

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )
