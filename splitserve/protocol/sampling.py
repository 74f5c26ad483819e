"""Per-request sampling parameters, validated once when the request is made (vLLM-shaped)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Sampling temperatures below this are treated as greedy (argmax): dividing by ~0 is not useful.
_GREEDY_EPS = 1e-5
# logit_bias entries per request. OpenAI documents no count; each entry costs a little every decode
# step, so a bound keeps one request from slowing the batch. A ban of more tokens than this is
# better written as allowed_token_ids.
MAX_LOGIT_BIAS = 1024
_STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# What the wire (proto/splitserve.proto SamplingParams) can carry: top_k is int32, seed int64,
# counts and token ids uint32. A value outside could not reach an engine.
_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match (vLLM's guided decoding; OpenAI's ``response_format``).

    Exactly one kind is set. The engine compiles it into a grammar over its tokenizer
    (``structured_output.py``) and masks every token that cannot continue a match; the output
    ends (finish reason "stop") when the grammar is complete and the model picks EOS.

    - ``json_schema``: JSON text of a JSON Schema (a dict is accepted and serialised); the
      output is compact JSON (``", "`` / ``": "`` separators) valid against it, without
      properties the schema does not list.
    - ``json_object``: any JSON object.
    - ``regex``: the whole output matches this regular expression.
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: an EBNF grammar (GBNF syntax, root rule ``root``).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, Mapping):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _compact_json_schema(self.json_schema))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_output.choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("structured_output.choice must not be empty")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_output.{name} must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_output.json_object must be a boolean")
        if sum(1 for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)) != 1:
            raise ValueError(
                "structured_output must set exactly one of " + ", ".join(_STRUCTURED_KINDS)
            )

    @property
    def kind(self) -> str:
        """The name of the field that is set."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))


def _compact_json_schema(text: object) -> str:
    """The schema as compact JSON text (equal schemas share one compiled grammar)."""
    if not isinstance(text, str):
        raise ValueError("structured_output.json_schema must be JSON text or an object")
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"structured_output.json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError("structured_output.json_schema must be a JSON object (a JSON Schema)")
    # Key order is kept: it is the order in which the output will list the properties.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output.

    Every check raises ``ValueError`` naming the offending field, so servers can turn it into a
    400 response without guessing. Defaults follow the OpenAI API / vLLM.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # {token id: bias} added to the logits (OpenAI; bias in [-100, 100]); stored as (id, bias)
    # pairs sorted by id, None when empty. A dict or (id, bias) pairs are accepted.
    logit_bias: tuple[tuple[int, float], ...] | None = None
    # vLLM: only these token ids may be sampled (None: any). An explicit empty list is an error.
    allowed_token_ids: tuple[int, ...] | None = None
    # Grammar-constrained output (JSON schema, regex, choice, EBNF); None: unconstrained.
    structured_output: StructuredOutput | None = None
    extra_keys: tuple[str, ...] = field(default=(), repr=False)  # e.g. cache salt / adapter

    def __post_init__(self) -> None:
        # Accept the common "stop='x'" / list spellings but store immutable tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "extra_keys", tuple(self.extra_keys or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.n > 128:
            bad("n", "must be <= 128")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= _INT32_MAX:
            bad("top_k", f"must be -1 (disabled) or a positive integer <= {_INT32_MAX}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", "must be in (0, 2]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= _UINT32_MAX
        ):
            bad("max_tokens", f"must be a positive integer <= {_UINT32_MAX}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= _UINT32_MAX:
            bad("min_tokens", f"must be a non-negative integer <= {_UINT32_MAX}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", "must not exceed max_tokens")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not _INT64_MIN <= self.seed <= _INT64_MAX
        ):
            bad("seed", "must be a 64-bit signed integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if len(self.stop) > 16:
            bad("stop", "may hold at most 16 strings")
        if any(not _is_token_id(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be token ids (integers in [0, 2**32))")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                bad(name, "must be an integer in [0, 20]")
        # logit_bias was checked as it was normalised (_bias_pairs).
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "must not be empty (leave it unset to allow every token)")
            if not all(_is_token_id(t) for t in self.allowed_token_ids):
                bad("allowed_token_ids", "must be non-negative integers")
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutput
        ):
            bad("structured_output", "must be a StructuredOutput")

    def check_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError naming the field if a logit_bias, allowed or stop token id is not in
        the vocabulary (only the engine and the router know its size)."""
        if any(t >= vocab_size for t, _ in self.logit_bias or ()):
            raise ValueError(f"logit_bias token ids must be < the vocabulary size {vocab_size}")
        if any(t >= vocab_size for t in self.allowed_token_ids or ()):
            raise ValueError(f"allowed_token_ids must be < the vocabulary size {vocab_size}")
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < the vocabulary size {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT32_MAX


def _bias_pairs(
    value: Mapping[int, float] | Iterable[tuple[int, float]] | None,
) -> tuple[tuple[int, float], ...] | None:
    """logit_bias, validated, as (id, float bias) pairs sorted by id; None when empty."""
    if not value:
        return None
    try:
        items = value.items() if isinstance(value, Mapping) else value
        pairs = [(t, b) for t, b in items]
    except (TypeError, ValueError):
        raise ValueError(
            f"logit_bias must map token ids to biases, got a {type(value).__name__}"
        ) from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(pairs)}")
    for t, b in pairs:
        if not _is_token_id(t):
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {t!r}")
        # The comparison also rejects NaN; bool is an int but not a bias.
        if isinstance(b, bool) or not isinstance(b, int | float) or not -100 <= b <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for {t}")
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias must not repeat a token id")
    return tuple(sorted((t, float(b)) for t, b in pairs))
