"""What the engine hands back: per-step deltas for streaming, and whole outputs (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from splitserve.protocol.logprobs import TokenLogprobs


@dataclass(frozen=True)
class RequestTiming:
    """Where a finished sequence's time went on this engine, in seconds (vLLM's intervals).

    All from one process's monotonic clock: queued = arrival -> first scheduled, prefill = first
    scheduled -> first token, decode = first token -> finish, inference = first scheduled ->
    finish. On a decode pod after a hand-off, "scheduled" is when the imported prompt joined the
    batch and the first token is the prefill pod's (adopted at that moment).
    """

    queued: float
    prefill: float
    decode: float
    inference: float
    num_preemptions: int = 0


@dataclass(frozen=True)
class SequenceDelta:
    """What one step added to one output sequence of one request."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # For requests added with hold_kv=True: the prompt's blocks, now held under the request id.
    held_block_ids: tuple[int, ...] | None = None
    # params.prompt_logprobs: with the first token, the logprob of every prompt token after the
    # first given the ones before it (len(prompt) - 1 entries).
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    # Set when the engine dropped the request instead of serving it (e.g. it waited in the queue
    # past the timeout); finish_reason is then "abort" and no tokens come.
    error: str | None = None
    # With the finishing delta: the sequence's timing on this engine.
    timing: RequestTiming | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def coalesce_deltas(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """Merge the deltas of each sample into one (in order of first appearance), for a consumer
    that fell behind: the same tokens, text and logprobs in fewer messages. A list holding a
    drop (``error``) is returned as it is."""
    if len(deltas) < 2 or any(d.error is not None for d in deltas):
        return deltas
    groups: dict[int, list[SequenceDelta]] = {}
    for d in deltas:
        groups.setdefault(d.index, []).append(d)
    if len(groups) == len(deltas):
        return deltas
    return [_merge(group) if len(group) > 1 else group[0] for group in groups.values()]


def _merge(group: list[SequenceDelta]) -> SequenceDelta:
    last = group[-1]
    logprobs = None
    if all(d.logprobs is not None for d in group):
        logprobs = tuple(lp for d in group for lp in d.logprobs or ())
    return replace(
        last,
        token_ids=tuple(t for d in group for t in d.token_ids),
        text="".join(d.text for d in group),
        logprobs=logprobs,
        prompt_logprobs=next((d.prompt_logprobs for d in group if d.prompt_logprobs), None),
        num_cached_tokens=max(d.num_cached_tokens for d in group),
        held_block_ids=next((d.held_block_ids for d in group if d.held_block_ids), None),
    )


@dataclass(frozen=True)
class ImportReservation:
    """Local blocks reserved for a prompt whose KV comes from another engine.

    ``block_ids[i]`` receives the prompt's block ``first_block + i``; blocks before
    ``first_block`` already hit this engine's own prefix cache and need no transfer.
    """

    request_id: str
    block_ids: tuple[int, ...]
    first_block: int


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(lp.logprob for lp in self.logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # params.prompt_logprobs: one entry per prompt token, None for the first (nothing precedes
    # it), as vLLM returns them; None when not requested
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def apply(self, delta: SequenceDelta) -> None:
        """Fold one step's delta into the accumulated output."""
        out = self.outputs[delta.index]
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None, *delta.prompt_logprobs]
        out.token_ids.extend(delta.token_ids)
        out.text += delta.text
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.stop_reason = delta.stop_reason
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
