"""``SpeculativeConfig``: vLLM's ``speculative_config`` dict, validated once into a frozen value.

Accepted keys (vLLM's names): ``method`` ("ngram" or "draft_model"; a ``model`` alone means
"draft_model"), ``num_speculative_tokens``, ``prompt_lookup_max`` / ``prompt_lookup_min`` (ngram),
``model`` (draft_model: an HF directory sharing the target's tokenizer), ``disable_by_batch_size``
(no drafts in a step where more requests than this are running: speculation pays at small
batches and costs compute at large ones). Any other key is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")
# The most drafts one step may verify per request (each costs a forward-pass row).
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None  # draft_model: the draft's HF directory (same vocabulary)
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"speculative_config.num_speculative_tokens must be an integer in "
                f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}"
            )
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {', '.join(METHODS)}, "
                f"got {self.method!r}"
            )
        for name in ("prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"speculative_config.{name} must be a positive integer")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config.model is for method draft_model, not ngram")
            # vLLM's defaults: both 5 when neither is given, else the one given for both.
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if lo is None and hi is None:
                lo = hi = 5
            lo, hi = lo or hi, hi or lo
            if lo > hi:
                raise ValueError(
                    f"speculative_config.prompt_lookup_min ({lo}) must not exceed "
                    f"prompt_lookup_max ({hi})"
                )
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if not self.model or not isinstance(self.model, str):
                raise ValueError("speculative_config.model (the draft's path) is required")
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ValueError("speculative_config.prompt_lookup_* are for method ngram")

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | str) -> SpeculativeConfig:
        """From vLLM's dict (or its JSON text, as ``--speculative-config`` takes it)."""
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(spec, Mapping):
            raise ValueError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unsupported keys {unknown}; supported: {sorted(known)}"
            )
        if "num_speculative_tokens" not in spec:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        values = dict(spec)
        if "method" not in values:
            values["method"] = "draft_model" if values.get("model") else "ngram"
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set, as ``from_dict`` takes them back."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}
