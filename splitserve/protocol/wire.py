"""Conversions between the engine's types and the wire protocol's messages."""

from __future__ import annotations

from splitserve.proto import splitserve_pb2 as pb
from splitserve.protocol.logprobs import TokenLogprobs, TopLogprob
from splitserve.protocol.lora import AdapterInfo
from splitserve.protocol.sampling import SamplingParams, StructuredOutput

_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
_FINISH_NAMES = {v: k for k, v in _FINISH.items()}

_OPTIONAL_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
)


def params_from_proto(msg: pb.SamplingParams, extra_keys=()) -> SamplingParams:
    """Build validated SamplingParams; raises ValueError naming the bad field."""
    kwargs: dict = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    if msg.max_tokens_unbounded:
        kwargs["max_tokens"] = None
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["extra_keys"] = tuple(extra_keys)
    if msg.logit_bias:
        kwargs["logit_bias"] = {t: _from_float32(b) for t, b in msg.logit_bias.items()}
    if msg.allowed_token_ids:  # empty on the wire: unset (an explicit empty list is rejected)
        kwargs["allowed_token_ids"] = tuple(msg.allowed_token_ids)
    if msg.HasField("structured_output"):
        kwargs["structured_output"] = structured_from_proto(msg.structured_output)
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        if name in kwargs:
            kwargs[name] = _from_float32(kwargs[name])
    if "repetition_penalty" in kwargs:
        kwargs["repetition_penalty"] = _from_float32(kwargs["repetition_penalty"])
    return SamplingParams(**kwargs)


def _from_float32(value: float) -> float:
    """float32 on the wire: round back to what the client most likely sent (6 digits)."""
    return float(f"{value:.6g}")


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
    for name in _OPTIONAL_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    if params.max_tokens is None:
        msg.ClearField("max_tokens")
        msg.max_tokens_unbounded = True
    msg.logit_bias.update(params.logit_bias or ())
    msg.allowed_token_ids.extend(params.allowed_token_ids or ())
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_to_proto(params.structured_output))
    return msg


def structured_to_proto(spec: StructuredOutput) -> pb.SamplingParams.StructuredOutput:
    msg = pb.SamplingParams.StructuredOutput()
    if spec.choice is not None:
        msg.choice.values.extend(spec.choice)
    else:
        setattr(msg, spec.kind, getattr(spec, spec.kind))
    return msg


def structured_from_proto(msg: pb.SamplingParams.StructuredOutput) -> StructuredOutput:
    """Raises ValueError naming the field when no kind is set or the spec is invalid."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output must set exactly one kind")
    if kind == "choice":
        return StructuredOutput(choice=tuple(msg.choice.values))
    return StructuredOutput(**{kind: getattr(msg, kind)})


def logprobs_to_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank) for t in lp.top],
    )


def logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(
        token_id=msg.token_id,
        logprob=msg.logprob,
        rank=msg.rank,
        top=tuple(TopLogprob(t.token_id, t.logprob, t.rank) for t in msg.top),
    )


def adapter_to_proto(info: AdapterInfo) -> pb.LoRAAdapter:
    return pb.LoRAAdapter(
        name=info.name, digest=info.digest, rank=info.rank, path=info.path, int_id=info.int_id
    )


def adapter_from_proto(msg: pb.LoRAAdapter) -> AdapterInfo:
    return AdapterInfo(
        name=msg.name, digest=msg.digest, rank=msg.rank, path=msg.path, int_id=msg.int_id
    )


def finish_to_proto(reason: str | None) -> int:
    return _FINISH[reason]


def finish_from_proto(value: int) -> str | None:
    return _FINISH_NAMES.get(value)
