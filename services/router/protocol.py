"""The OpenAI request schemas the router accepts (pydantic), and their mapping to engine params.

Validation is where typed schemas pay off: a bad field becomes a 400 naming it, and the same
models build the OpenAPI document. Types are strict (``n: true`` or ``"2"`` is not an integer,
as with OpenAI) and every number is bounded by what the wire and the engine accept: protobuf's
integer widths (``top_k`` int32, ``seed`` int64, token ids and counts uint32) and the engine's
``SamplingParams`` ranges (temperature narrowed to OpenAI's [0, 2] unless the router's
``--max-temperature`` widens it, up to the engine's 100). Unknown fields are ignored, as the
OpenAI API does, so newer SDKs keep working. Responses are modelled in ``responses.py``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from splitserve.protocol.sampling import MAX_LOGIT_BIAS, SamplingParams, StructuredOutput
from splitserve.services.router.tools import ToolPlan, plan_tools

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1
# Temperatures the router accepts unless configured otherwise (OpenAI's range), and the most
# the engine accepts (SamplingParams) whatever the configuration.
DEFAULT_MAX_TEMPERATURE = 2.0
ENGINE_MAX_TEMPERATURE = 100.0
# JSON-valued fields (schemas, tool parameters) go through recursive code (the metaschema check,
# the grammar compiler, chat templates): nesting is bounded well below Python's recursion limit.
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 100_000
MAX_STOP = 16  # SamplingParams' bound
MAX_TOOLS = 128  # OpenAI's

TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]
Count = Annotated[int, Field(ge=1, le=UINT32_MAX)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def check_json_depth(value: Any, field: str, limit: int = MAX_SCHEMA_DEPTH) -> Any:
    """``value`` unchanged; ValueError naming ``field`` when nested deeper than ``limit`` (or
    bigger than ``MAX_SCHEMA_NODES`` values). Iterative: it cannot itself recurse too deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > limit:
            raise ValueError(f"{field} is nested deeper than {limit} levels")
        if nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"{field} has more than {MAX_SCHEMA_NODES} values")
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return value


class _Model(BaseModel):
    # strict: JSON types as written (no bool for int, no "2" for 2); ints are accepted as floats.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Model):
    """A tool's function: ``parameters`` is the JSON Schema of its arguments (an object)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted; a forced call always matches its schema exactly

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_depth(value, "parameters")


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: ToolChoiceFunction


class CalledFunction(_Model):
    name: str
    arguments: str  # JSON text, as the OpenAI API returns and takes back


class MessageToolCall(_Model):
    """A call an assistant message made (sent back by the client in later turns)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """One clear message for a non-text part instead of the union's per-member noise."""
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(
                        f"content part of type {str(kind)[:40]!r} is not supported: this "
                        "server takes text only ({'type': 'text', 'text': ...})"
                    )
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string `text`")
        elif value is not None and not isinstance(value, str):
            raise ValueError("content must be a string, a list of text parts or null")
        return value

    def text(self) -> str:
        """Content as one string (list parts concatenated, as chat templates expect)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(_Model):
    """OpenAI ``response_format.json_schema``. ``strict`` is accepted and always in force: the
    output never holds properties the schema does not list."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_json_depth(value, "schema")


class ResponseFormat(_Model):
    """OpenAI ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(_Model):
    """Fields shared by completions and chat completions."""

    model: str
    n: Annotated[int, Field(ge=1, le=128)] = 1
    # Bounded by the engine's 100 here; the router's configured maximum (OpenAI's 2 unless
    # --max-temperature says otherwise) is checked against the validation context.
    temperature: Annotated[float, Field(ge=0, le=ENGINE_MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 / 0: disabled
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    # int64 on the wire; sample i draws with seed + i (torch generators take any 64-bit value).
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    max_tokens: Count | None = None
    min_tokens: Annotated[int, Field(ge=0, le=UINT32_MAX)] = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None  # only with stream: true
    user: str | None = None
    cache_salt: str | None = None  # isolates prefix-cache sharing (part of the block hashes)
    # OpenAI: token id (a decimal string) -> bias in [-100, 100].
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)
        ]
        | None
    ) = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None  # vLLM
    response_format: ResponseFormat | None = None
    # vLLM's guided decoding extensions; at most one of them, and not with response_format.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: NonEmptyStr | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: NonEmptyStr | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = (info.context or {}).get("max_temperature", DEFAULT_MAX_TEMPERATURE)
        if value is not None and value > limit:
            raise ValueError(
                f"temperature must be in [0, {limit:g}] (the router's --max-temperature widens "
                f"the range up to {ENGINE_MAX_TEMPERATURE:g})"
            )
        return value

    @field_validator("guided_json")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        return check_json_depth(value, "guided_json") if isinstance(value, dict) else value

    def check_fields(self) -> None:
        """Rules between fields; raises ``ValueError`` whose first word names the field."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")

    def sampling_params(
        self, *, max_tokens: int | None, logprobs: int | None, default_max: int | None
    ) -> SamplingParams:
        """Validated engine params; raises ``ValueError`` naming the field (-> 400)."""
        fields: dict[str, Any] = {
            "n": self.n,
            "seed": self.seed,
            "stop": tuple(self.stop or ()),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logprobs": logprobs,
            "max_tokens": default_max if max_tokens is None else max_tokens,
            "extra_keys": (self.cache_salt,) if self.cache_salt else (),
            "logit_bias": _token_id_keys(self.logit_bias),
            "allowed_token_ids": self.allowed_token_ids,
            "structured_output": self.structured_output(),
        }
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return SamplingParams(**fields)

    def constraint_fields(self) -> list[str]:
        """The output-constraint fields this request sets, ``response_format`` first."""
        given = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    def structured_output(self) -> StructuredOutput | None:
        """The output constraint of ``response_format`` or a ``guided_*`` field (None: free
        text); raises ``ValueError`` naming the field (-> 400)."""
        given = self.constraint_fields()
        if len(given) > 1:
            raise ValueError(f"{given[1]} cannot be combined with {given[0]}: give one of them")
        if not given:
            return None
        field = given[0]
        if field == "response_format":
            return _response_format(self.response_format)  # type: ignore[arg-type]
        if field == "guided_json":
            return StructuredOutput(json_schema=_json_schema(self.guided_json, field))
        value = getattr(self, field)
        if not value:
            raise ValueError(f"{field} must not be empty")
        kind = field.removeprefix("guided_")
        return StructuredOutput(**{kind: tuple(value) if kind == "choice" else value})


def _response_format(fmt: ResponseFormat) -> StructuredOutput:
    if fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt.json_schema is None:
        raise ValueError("response_format.json_schema is required when type is 'json_schema'")
    field = "response_format.json_schema.schema"
    if fmt.json_schema.schema_ is None:
        raise ValueError(f"{field} is required")
    return StructuredOutput(json_schema=_json_schema(fmt.json_schema.schema_, field))


def _json_schema(schema: dict[str, Any] | str | None, field: str) -> str:
    """A JSON Schema given as an object or as JSON text, checked against its metaschema,
    as compact JSON text; raises ValueError naming ``field``."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{field} is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON object (a JSON Schema)")
    check_json_depth(schema, field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = f" (at {'/'.join(str(p) for p in err.path)})" if err.path else ""
        raise ValueError(f"{field} is not a valid JSON Schema: {err.message}{where}") from None
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _token_id_keys(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key!r}")
        if int(key) in out:
            raise ValueError(f"logit_bias has token id {int(key)} twice")
        out[int(key)] = value
    return out


def _prompt_kind(value: Any) -> str | None:
    """Which form a prompt takes, from its first element: the union is then checked against
    that member alone (a million token ids would otherwise be tried, and fail one by one,
    as strings first)."""
    if isinstance(value, str):
        return "prompt:text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else None
    if isinstance(first, str):
        return "prompt:texts"
    if isinstance(first, list):
        return "prompt:token_lists"
    return "prompt:tokens"


PromptInput = Annotated[
    Annotated[str, Tag("prompt:text")]
    | Annotated[list[str], Field(min_length=1), Tag("prompt:texts")]
    | Annotated[list[TokenId], Tag("prompt:tokens")]
    | Annotated[list[list[TokenId]], Tag("prompt:token_lists")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt",
        custom_error_message="prompt must be a string, a list of strings, a list of token ids "
        "or a list of lists of token ids",
    ),
]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None  # refused (400) when not empty: no fill-in-the-middle
    # Sample this many per prompt, return the n most likely.
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None

    def samples_per_prompt(self) -> int:
        """``best_of`` (default ``n``); raises ``ValueError`` naming the field (-> 400)."""
        if self.best_of is None:
            return self.n
        if not 1 <= self.best_of <= 128:
            raise ValueError("best_of must be an integer in [1, 128]")
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.stream and self.best_of > self.n:
            raise ValueError("best_of > n cannot be streamed (the best are known at the end)")
        return self.best_of

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]
        if isinstance(p[0], list):
            return [list(x) for x in p]  # type: ignore[arg-type]
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Count | None = None
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_plan(self) -> ToolPlan | None:
        """How ``tools`` / ``tool_choice`` shape this request (None: no tools); raises
        ``ValueError`` naming the field (-> 400)."""
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def structured_output(self) -> StructuredOutput | None:
        """A forcing ``tool_choice`` is itself the output constraint, so it excludes the
        others."""
        own = super().structured_output()
        plan = self.tool_plan()
        forced = plan.constraint() if plan is not None else None
        if forced is None:
            return own
        if own is not None:
            field = self.constraint_fields()[0]
            raise ValueError(f"{field} cannot be combined with a tool_choice that forces a call")
        return forced

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs requires logprobs = true")
            return None
        return self.top_logprobs or 0


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(_Model):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    lora_name: Annotated[str, Field(min_length=1, max_length=128)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRAAdapterRequest(_Model):
    """vLLM's ``POST /v1/unload_lora_adapter`` (``lora_int_id`` is accepted and ignored)."""

    lora_name: Annotated[str, Field(min_length=1, max_length=128)]
    lora_int_id: int | None = None
