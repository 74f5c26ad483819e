"""Checks of the engine servers' incoming messages against what the engine can take.

proto3 accepts any value of a field's type: an empty request id, a million prompt tokens, ids
past the vocabulary, an unknown enum number, a hand-off whose lists disagree. The prefill and
decode servers run these checks first and answer ``INVALID_ARGUMENT`` with the message, so a
malformed or hostile message never reaches the engine thread (where a bad token id would
fail a whole batch). Each raises ``ValueError`` naming the field.

Bytes that do not parse as the method's message never reach a servicer: grpc answers them
``UNKNOWN`` ("Unexpected DecodeError") by itself. ``MalformedMessageInterceptor``, given to
``grpc.aio.server(interceptors=[...])``, answers them ``INVALID_ARGUMENT`` with the parse error
instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.lora import check_adapter_name

MAX_REQUEST_ID = 256  # characters
MAX_EXTRA_KEYS = 16
MAX_EXTRA_KEY = 1024  # characters each
_FINISH_REASONS = frozenset(pb.FinishReason.values())


def check_prefill_request(
    msg: pb.PrefillRequest, *, vocab_size: int, max_model_len: int, where: str = ""
) -> None:
    """A ``PrefillRequest`` the engine can run (its sampling params are checked on their own,
    by ``params_from_proto``)."""
    if not msg.request_id:
        raise ValueError(f"{where}request_id must not be empty")
    if len(msg.request_id) > MAX_REQUEST_ID:
        raise ValueError(f"{where}request_id is longer than {MAX_REQUEST_ID} characters")
    n = len(msg.prompt_token_ids)
    if n == 0:
        raise ValueError(f"{where}prompt_token_ids must not be empty")
    if n >= max_model_len:
        raise ValueError(
            f"{where}prompt_token_ids has {n} tokens, the model's maximum length is "
            f"{max_model_len} (including at least one generated token)"
        )
    _check_ids(msg.prompt_token_ids, vocab_size, f"{where}prompt_token_ids")
    if len(msg.extra_keys) > MAX_EXTRA_KEYS:
        raise ValueError(f"{where}extra_keys may hold at most {MAX_EXTRA_KEYS} keys")
    if any(len(k) > MAX_EXTRA_KEY for k in msg.extra_keys):
        raise ValueError(f"{where}extra_keys must be at most {MAX_EXTRA_KEY} characters each")
    if msg.HasField("lora"):
        check_adapter_name(msg.lora.name, f"{where}lora.name")
        if len(msg.lora.digest) > 64:
            raise ValueError(f"{where}lora.digest is longer than 64 characters")


def check_generate_request(
    msg: pb.GenerateRequest, *, vocab_size: int, max_model_len: int, block_size: int
) -> None:
    """A ``GenerateRequest``: its request, and its hand-off when it has one."""
    if not msg.HasField("request"):
        raise ValueError("request must be set")
    check_prefill_request(
        msg.request, vocab_size=vocab_size, max_model_len=max_model_len, where="request."
    )
    if msg.HasField("prefill"):
        check_prefill_response(
            msg.prefill, len(msg.request.prompt_token_ids), vocab_size=vocab_size,
            block_size=block_size,
        )  # fmt: skip


def check_prefill_response(
    msg: pb.PrefillResponse, prompt_len: int, *, vocab_size: int, block_size: int
) -> None:
    """A hand-off that fits the prompt it claims to hold and this engine's vocabulary."""
    if not msg.first_tokens:
        raise ValueError("prefill.first_tokens must not be empty")
    for i, t in enumerate(msg.first_tokens):
        where = f"prefill.first_tokens[{i}]"
        _check_ids([t.token_id], vocab_size, f"{where}.token_id")
        if t.finish_reason not in _FINISH_REASONS:
            raise ValueError(f"{where}.finish_reason {t.finish_reason} is not a FinishReason")
        if t.HasField("logprobs"):
            lp = t.logprobs
            _check_ids([lp.token_id, *(x.token_id for x in lp.top)], vocab_size, where)
    if not msg.HasField("handoff"):
        return
    h = msg.handoff
    if h.block_size and h.block_size != block_size:
        raise ValueError(f"prefill.handoff.block_size {h.block_size} != this pod's {block_size}")
    if len(h.block_ids) != len(h.block_checksums):
        raise ValueError("prefill.handoff has a different number of block ids and checksums")
    most = -(-prompt_len // block_size)
    if len(h.block_ids) > most:
        raise ValueError(
            f"prefill.handoff has {len(h.block_ids)} blocks for a {prompt_len}-token prompt"
        )
    if h.num_tokens > prompt_len:
        raise ValueError(
            f"prefill.handoff covers {h.num_tokens} tokens of a {prompt_len}-token prompt"
        )


def _check_ids(ids: Iterable[int], vocab_size: int, field: str) -> None:
    if any(t >= vocab_size for t in ids):  # uint32 on the wire: never negative
        raise ValueError(f"{field} must be token ids < the vocabulary size {vocab_size}")


class _Malformed:
    """What the wrapped deserializer returns for bytes that do not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """Unary-request methods: a request that cannot be parsed is ``INVALID_ARGUMENT``."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError and whatever a parser raises
                return _Malformed(f"{type(exc).__name__}: {exc}")

        details = f"{method}: the request is not a valid protobuf message"
        if handler.response_streaming:
            behavior = _wrap_stream(handler.unary_stream, details)
            make = grpc.unary_stream_rpc_method_handler
        else:
            behavior = _wrap_unary(handler.unary_unary, details)
            make = grpc.unary_unary_rpc_method_handler
        return make(
            behavior,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def _wrap_unary(fn: Callable[..., Any], details: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        async def unary(request, context):
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{details} ({request.reason})"
                )
            return await fn(request, context)

        return unary

    def sync_unary(request, context):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{details} ({request.reason})")
        return fn(request, context)

    return sync_unary


def _wrap_stream(fn: Callable[..., Any], details: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        async def stream(request, context):
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{details} ({request.reason})"
                )
            async for message in fn(request, context):
                yield message

        return stream

    def sync_stream(request, context):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{details} ({request.reason})")
        yield from fn(request, context)

    return sync_stream
