"""Incremental detokenization of one output sequence, with stop strings.

Two problems are solved here, one after the other, for each batch of new tokens:

1. **Token ids -> text, a few tokens at a time.** Byte-level BPE splits a multi-byte UTF-8
   character over several tokens, and SentencePiece-style decoders need the previous token to know
   whether a word starts with a space. We keep the sliding window of vLLM / TGI
   (``prefix_offset`` <= ``read_offset`` into the token list): each step decodes only
   ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]`` and emits the difference, and
   only once it no longer ends in U+FFFD (an incomplete character). The window starts with a few
   prompt tokens so the first output token is decoded in context.
2. **Stop strings.** Decoded text is emitted only up to the longest suffix that could still be the
   start of a stop string; the first stop string to complete (the one a reader going character by
   character would see first) ends the sequence, and everything after it is dropped.

Invariant (tested): the concatenation of every delta and ``finish()`` equals
``tokenizer.decode(output_ids, skip_special_tokens=...)`` (without clean-up of tokenization
spaces), cut at the stop string when one matched. For tokenizers whose decoder strips the leading
space of the first token (SentencePiece ``Metaspace``), the output instead keeps that space, as a
continuation of the prompt should.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from splitserve.protocol.sampling import SamplingParams

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context before the first output token (vLLM uses 5); more are tried
# when those few start in the middle of a character.
_MIN_CONTEXT = 5
_MAX_CONTEXT = 24
# Drop ids that left the decode window once this many have piled up.
_TRIM_AFTER = 64


@dataclass(frozen=True)
class DetokenizerDelta:
    """What one ``update`` made safe to emit."""

    text: str  # new text safe to emit now (may be "")
    # The stop string that matched (then the request must stop). ``text`` then ends right before
    # it (or includes it with params.include_stop_str_in_output) and output_text is final.
    stop_string: str | None = None


def _decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[Sequence[int]], str]:
    """The cheapest exact ``ids -> str`` the tokenizer offers (no clean-up of spaces)."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else None
    backend = getattr(tokenizer, "backend_tokenizer", backend)
    if backend is not None:

        def decode(ids: Sequence[int]) -> str:
            return backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

        return decode

    def slow_decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    return slow_decode


class IncrementalDetokenizer:
    """Detokenizes one output sequence as tokens arrive; one instance per sample.

    Not thread-safe; ``update`` and ``finish`` mutate the instance. After a stop string matched or
    ``finish`` was called, further calls return empty results.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._decode = _decode_fn(tokenizer, params.skip_special_tokens)
        self._stops = tuple(params.stop)
        self._include_stop = params.include_stop_str_in_output
        context = self._prompt_context(prompt_token_ids)
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Decoded text not handed out yet: at most a possible start of a stop string (short).
        self._pending = ""
        self._out: list[str] = []  # handed-out text, joined lazily (no quadratic +=)
        self._stop_string: str | None = None
        self._done = False

    def _prompt_context(self, prompt: Sequence[int]) -> Sequence[int]:
        """The last few prompt tokens, chosen so that they decode to whole characters."""
        if len(prompt) <= _MIN_CONTEXT:
            tail = list(prompt)
            return tail if _REPLACEMENT not in self._decode(tail) else []
        for n in range(_MIN_CONTEXT, min(len(prompt), _MAX_CONTEXT) + 1):
            tail = list(prompt[-n:])
            if _REPLACEMENT not in self._decode(tail):
                return tail
        return []

    @property
    def output_text(self) -> str:
        """Everything emitted so far (final once a stop string matched or after ``finish``)."""
        if len(self._out) > 1:
            self._out[:] = ["".join(self._out)]
        return self._out[0] if self._out else ""

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stop_string

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Append generated tokens; return the text now safe to emit and any stop string hit."""
        if self._done:
            return DetokenizerDelta("")
        start = len(self._pending)
        pieces = [self._pending]
        for token_id in new_token_ids:
            self._ids.append(token_id)
            pieces.append(self._step())
        self._pending = "".join(pieces)
        return self._emit(start, final=False)

    def finish(self) -> str:
        """Flush what is held back when the request ends for another reason (eos, length, abort).

        That is an incomplete character at the end (emitted as U+FFFD, as a full decode would) and
        a possible start of a stop string. A stop string completed by that text still truncates.
        """
        if self._done:
            return ""
        start = len(self._pending)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text):
            self._pending += new_text[len(prefix_text) :]
        delta = self._emit(start, final=True)
        self._done = True
        return delta.text

    def _step(self) -> str:
        """Decode the window after one appended token; "" while the text is incomplete."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            if self._prefix_offset > _TRIM_AFTER:  # keep the id list short; offsets move along
                del self._ids[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
            return new_text[len(prefix_text) :]
        return ""

    def _emit(self, start: int, final: bool) -> DetokenizerDelta:
        """Hand out pending text, given that ``_pending[start:]`` is new.

        A stop string always begins inside the pending text: everything before it was emitted
        only because no suffix of it could begin a stop string.
        """
        text = self._pending
        match = self._find_stop(text, start) if len(text) > start else None
        if match is not None:
            begin, stop = match
            delta = text[: begin + len(stop) if self._include_stop else begin]
            self._pending = ""
            self._stop_string = stop
            self._done = True
        else:
            safe = len(text) if final else len(text) - self._held_back(text)
            delta, self._pending = text[:safe], text[safe:]
        if delta:
            self._out.append(delta)
        return DetokenizerDelta(delta, None if match is None else match[1])

    def _find_stop(self, text: str, start: int) -> tuple[int, str] | None:
        """The stop string that completes first in ``text``, among matches ending after start.

        Earlier text held no complete match (we would have stopped), so only matches that end in
        the new text are searched. Among them the earliest end wins, then the earliest begin.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            begin = text.find(stop, max(0, start - len(stop) + 1))
            if begin >= 0:
                key = (begin + len(stop), begin, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
