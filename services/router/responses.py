"""OpenAI response bodies and stream chunks, built from the decode pods' messages.

Typed models (``response_models.py``) in exactly the shapes the official SDK parses:
completions, chat completions, their ``chunk`` variants, usage with
``prompt_tokens_details.cached_tokens`` and both logprobs formats (the legacy completions one and
the chat ``content`` list). The same models document the responses in ``/openapi.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from splitserve.proto import splitserve_pb2 as pb
from splitserve.services.router.response_models import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from splitserve.services.router.tokenizer import RouterTokenizer

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass
class SampleResult:
    """One choice accumulated from its stream."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprobs] = field(default_factory=list)  # echo + logprobs
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, msg: pb.GenerateResponse) -> None:
        self.text += msg.text
        self.token_ids.extend(msg.token_ids)
        self.logprobs.extend(msg.logprobs)
        self.prompt_logprobs.extend(msg.prompt_logprobs)
        if msg.finish_reason:
            self.finish_reason = FINISH_REASONS[msg.finish_reason]
        if msg.HasField("usage"):
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.cached_tokens = msg.usage.cached_tokens

    @property
    def cumulative_logprob(self) -> float:
        """The sampled tokens' summed logprob (needs logprobs requested, at least 0)."""
        return sum(e.logprob for e in self.logprobs)


def most_likely(results: list[SampleResult], group: int, keep: int) -> list[SampleResult]:
    """``best_of``: of each prompt's ``group`` consecutive samples, the ``keep`` with the highest
    cumulative logprob, best first (ties: the earlier sample)."""
    out = []
    for start in range(0, len(results), group):
        ranked = sorted(results[start : start + group], key=lambda r: -r.cumulative_logprob)
        out.extend(ranked[:keep])
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def total_usage(results: list[SampleResult], prompt_lens: list[int]) -> Usage:
    """Usage of a request: each prompt counted once (n samples share it), every sample's output.

    Cached tokens: the best cache hit of each prompt's samples (the prompt was served once from
    the client's point of view).
    """
    per_prompt_cached: dict[int, int] = {}
    n = max(1, len(results) // max(1, len(prompt_lens)))
    for r in results:
        p = r.index // n
        per_prompt_cached[p] = max(per_prompt_cached.get(p, 0), r.cached_tokens)
    return usage(
        sum(prompt_lens),
        sum(r.completion_tokens or len(r.token_ids) for r in results),
        sum(per_prompt_cached.values()),
    )


# ---- logprobs ----------------------------------------------------------------------------------


def completion_logprobs(
    tok: RouterTokenizer, entries: list[pb.TokenLogprobs], text_offset: int
) -> CompletionLogprobs:
    """The legacy completions format: parallel lists plus per-position top dicts."""
    tokens, lps, tops, offsets = [], [], [], []
    offset = text_offset
    for e in entries:
        text = tok.token_text(e.token_id)
        tokens.append(text)
        lps.append(e.logprob)
        tops.append({tok.token_text(t.token_id): t.logprob for t in e.top} if e.top else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets
    )


def echo_logprobs(
    tok: RouterTokenizer,
    prompt_ids: list[int],
    prompt_entries: list[pb.TokenLogprobs],
    entries: list[pb.TokenLogprobs],
) -> CompletionLogprobs:
    """Completions logprobs with ``echo``: the prompt's tokens first (the first one has no
    logprob: nothing precedes it, OpenAI sends null), then the completion's."""
    first = tok.token_text(prompt_ids[0])
    rest = completion_logprobs(tok, [*prompt_entries, *entries], len(first))
    return CompletionLogprobs(
        tokens=[first, *rest.tokens],
        token_logprobs=[None, *rest.token_logprobs],
        top_logprobs=[None, *rest.top_logprobs],
        text_offset=[0, *rest.text_offset],
    )


def chat_logprobs(tok: RouterTokenizer, entries: list[pb.TokenLogprobs]) -> ChatLogprobs:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(
        content=[
            TokenLogprob(
                **item(e.token_id, e.logprob),
                top_logprobs=[TopLogprob(**item(t.token_id, t.logprob)) for t in e.top],
            )
            for e in entries
        ]
    )


# ---- bodies -----------------------------------------------------------------------------------


def to_json(model: BaseModel) -> bytes:
    """A response model as JSON bytes: the fields that were set (``null`` included), so optional
    parts (a chunk's ``usage``, a message's ``tool_calls``) appear only when present."""
    return model.model_dump_json(exclude_unset=True).encode()


def sse(payload: BaseModel | bytes) -> bytes:
    """One server-sent event (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, bytes) else to_json(payload)
    return b"data: " + data + b"\n\n"


SSE_DONE = sse(b"[DONE]")
