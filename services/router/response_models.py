"""The router's response bodies as typed models: what the handlers build and /openapi.json shows.

Shapes follow the OpenAI API (and vLLM's extensions: ``/tokenize``, ``/detokenize``,
``/version``). Bodies are serialised with ``exclude_unset`` (``responses.to_json``): a field that
OpenAI sends as ``null`` is set to None explicitly, one it leaves out (a chunk's ``usage``
before the end, a message's ``tool_calls`` without calls) is simply not set.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    # Responses are built by this process: a stray field is a bug, not a newer client.
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Out):
    cached_tokens: int  # prompt tokens served from a prefix cache


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# ---- logprobs ----------------------------------------------------------------------------------


class CompletionLogprobs(_Out):
    """The legacy completions format: parallel lists, ``None`` for a position without one."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


# ---- completions -------------------------------------------------------------------------------


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Out):
    """One ``data:`` event of a streamed completion (``usage`` on the last, when asked)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- chat completions --------------------------------------------------------------------------


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON text


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta | None = None


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Out):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- the rest of the API -----------------------------------------------------------------------


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None  # vLLM: the context limit the router checks
    root: str | None = None  # vLLM: the base model, or a LoRA adapter's path
    parent: str | None = None  # vLLM: a LoRA adapter's base model (None for base models)


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    prompt: str


class HealthResponse(_Out):
    status: Literal["ok", "idle", "unavailable"]
    prefill_pods: int
    decode_pods: int
    instance_id: str


class VersionResponse(_Out):
    version: str


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(_Out):
    """Every non-2xx body (and a stream's ``error`` event)."""

    error: ErrorDetail
