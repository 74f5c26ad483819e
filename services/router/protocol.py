"""The OpenAI request schemas the router accepts (pydantic), and their mapping to engine params.

Only the request side is modelled: validation is where typed schemas pay off (a bad field becomes a
400 naming it). Responses are built by ``responses.py``. Unknown fields are ignored, as the OpenAI
API does, so newer SDKs keep working.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitserve.protocol.sampling import SamplingParams, StructuredOutput
from splitserve.services.router.tools import ToolPlan, plan_tools


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


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


class ResponseFormat(_Model):
    """OpenAI ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(_Model):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None  # isolates prefix-cache sharing (part of the block hashes)
    logit_bias: dict[str, float] | None = None  # OpenAI: token id (as a string) -> bias
    allowed_token_ids: list[int] | None = None  # vLLM extension
    response_format: ResponseFormat | None = None
    # vLLM's guided decoding extensions; at most one of them, and not with response_format.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        return [value] if isinstance(value, str) else list(value)

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
        except ValueError as err:
            raise ValueError(f"{field} is not valid JSON: {err}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON object (a JSON Schema)")
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
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"logit_bias keys must be token ids (decimal strings), got {key!r}")
        if int(key) in out:
            raise ValueError(f"logit_bias has token id {int(key)} twice")
        out[int(key)] = value
    return out


PromptInput = str | Annotated[list[str], Field(min_length=1)] | list[int] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None  # sample this many per prompt, return the n most likely

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
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
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
    tokens: list[int]
