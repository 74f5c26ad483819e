"""The router's tokenizer: the same HF tokenizer and chat template the engines use.

The router tokenizes every prompt itself, because routing needs the token ids (to hash prompt blocks
exactly as the engines do) and because the prefill pod takes token ids, not text. The engine
encodes string prompts with ``add_special_tokens=True`` and chats with the model's chat template;
this mirrors both, so greedy output through the router equals the offline engine. The files come
from the engines (``EngineInfo``); a ``tokenizer.json`` loads without torch (the router process
never maps libtorch), other tokenizers through ``AutoTokenizer``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RouterTokenizer:
    """Prompt encoding, chat templating and per-token strings for logprobs."""

    def __init__(self, model_dir: Path) -> None:
        if (Path(model_dir) / "tokenizer.json").is_file():
            # AutoTokenizer would import torch (it resolves model classes); the fast tokenizer
            # class alone reads the same files and encodes identically.
            from transformers import PreTrainedTokenizerFast as Tokenizer
        else:  # sentencepiece / vocab-file tokenizers
            from transformers import AutoTokenizer as Tokenizer

        self._tok = Tokenizer.from_pretrained(str(model_dir))
        self.eos_token_id = self._tok.eos_token_id
        self._token_text = functools.lru_cache(maxsize=65536)(self._decode_one)

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes one token stands for, when the tokenizer maps text to tokens
        without a normalizer (which could delete text); None when no such bound holds."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None or backend.normalizer is not None:
            return None
        keys = list(self._tok.get_vocab())
        kinds = {type(backend.pre_tokenizer).__name__, type(backend.decoder).__name__}
        if "ByteLevel" in kinds:
            return max(map(len, keys), default=1)  # byte-level: one character per byte
        return 4 * max(map(len, keys), default=1)  # at most 4 UTF-8 bytes per character

    def min_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` found without tokenizing (0: none known).

        Lets the router refuse a prompt that cannot fit the context before spending seconds
        of CPU on it.
        """
        per_token = self.max_token_bytes
        if not per_token or not text:
            return 0
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        return -(-n_bytes // per_token)

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(prompt, add_special_tokens=add_special_tokens))

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        encoded = self._tok.apply_chat_template(
            list(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        return list(encoded["input_ids"])

    def is_special(self, text: str) -> bool:
        """Whether ``text`` is a special token (decoding may skip it)."""
        return text in self._tok.all_special_tokens

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template shows ``tools`` to the model (many small models' don't)."""
        user = [{"role": "user", "content": "hi"}]
        return self._differs(user, user, tools=[_PROBE_TOOL])

    @functools.cached_property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template writes assistant ``tool_calls`` (else they would vanish)."""
        plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
        call = {"type": "function", "function": {"name": "probe_fn", "arguments": {"a": 1}}}
        with_call = [plain[0], {**plain[1], "tool_calls": [{"id": "call_0", **call}]}]
        return self._differs(plain, with_call)

    def _differs(self, a: list[dict[str, Any]], b: list[dict[str, Any]], **kw: Any) -> bool:
        try:
            render = functools.partial(self._tok.apply_chat_template, tokenize=False)
            return bool(render(a) != render(b, **kw))
        except Exception:  # noqa: BLE001 - a template that fails on the probe cannot use it
            return False

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as a logprobs entry shows it (cached: the vocabulary is small)."""
        return self._token_text(int(token_id))

    def _decode_one(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_fn",
        "description": "probe",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}
