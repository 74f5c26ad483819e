"""Grammar-constrained decoding with xgrammar: compile specs, track each sequence, fill bitmasks.

One ``StructuredOutputs`` per engine owns an xgrammar ``GrammarCompiler`` built from the engine's
tokenizer (vocabulary = the model's logits width, stop tokens = the engine's EOS ids) and a
bounded cache of compiled grammars keyed by the ``StructuredOutput`` spec. Each constrained
sequence gets its own ``SequenceGrammar`` (an xgrammar ``GrammarMatcher``), created with the
request and dropped with it (abort, finish), so nothing here needs explicit clean-up.

Per step the engine asks for one packed bitmask over the batch (``fill_bitmask``: the C++
matcher writes each constrained row, unconstrained rows are skipped); the sampler masks the
logits with it in one tensor op; ``SequenceGrammar.advance`` then moves each matcher past the
sampled token. The grammar ends a sequence when its matcher accepts a stop token (EOS is only
allowed where the grammar may end).

State is only ever moved forward by sampled (or adopted) tokens, which the request also keeps,
so preemption (recompute) needs nothing here: the matcher already is where the output is.
Draft tokens (speculative decoding) are walked to fill the masks of the positions after them
and rolled back at once (``fill_ahead``); only the tokens the target keeps advance the matcher.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from splitserve.protocol.sampling import StructuredOutput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Compiled grammars kept per engine (least recently used dropped first). A JSON-schema grammar
# for a 49k vocabulary takes tens of kB; compiling one takes a few ms.
_CACHE_SIZE = 256
# ... and at most this many bytes of them (a large schema's grammar holds per-token tables).
_CACHE_BYTES = 256 << 20
# Compilation threads: the engine compiles between steps, on its own thread, so keep it small.
_COMPILE_THREADS = 2


@dataclass(frozen=True)
class TokenBitmask:
    """Which tokens each constrained row may sample next, in xgrammar's packed layout.

    ``bits`` is int32 [batch, ceil(vocab / 32)]: bit ``j`` of word ``w`` set means token
    ``32 * w + j`` is allowed. Only the batch rows listed in ``rows`` are constrained (their
    ``bits`` rows are filled); other rows of ``bits`` are unspecified.
    """

    bits: torch.Tensor
    rows: tuple[int, ...]

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """bool [len(rows), vocab_size]: the unpacked masks of the constrained rows (the slow
        reference the tests compare the sampler against)."""
        words = self.bits[list(self.rows)].to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(32, dtype=torch.int64)
        unpacked = (words.unsqueeze(-1) >> shifts) & 1
        return unpacked.reshape(len(self.rows), -1)[:, :vocab_size].bool()


class SequenceGrammar:
    """One sequence's position in its grammar. Mutated only by ``advance``."""

    __slots__ = ("_matcher", "done")

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher
        self.done = False  # the grammar ended here (or a token it forbids was forced on it)

    def advance(self, token_id: int) -> bool:
        """Move past a sampled token; True when the sequence must end here.

        That is when the matcher accepted a stop token (the grammar is complete), or when it
        rejected the token, which only happens if other constraints (``allowed_token_ids``)
        left the row no allowed token at all.
        """
        if self.done:
            return True
        if not self._matcher.accept_token(token_id):
            log.warning("token %d breaks the grammar; ending the sequence", token_id)
            self.done = True
        elif self._matcher.is_terminated():
            self.done = True
        return self.done

    def fill(self, bits: torch.Tensor, row: int) -> bool:
        """Write this sequence's next-token mask into ``bits[row]``; False if every token is
        allowed (the row then needs no masking)."""
        return self._matcher.fill_next_token_bitmask(bits, row)

    def fill_ahead(self, bits: torch.Tensor, first_row: int, drafts: Sequence[int]) -> list[int]:
        """Masks for a sequence verifying ``drafts`` (speculative decoding): row
        ``first_row + j`` gets the mask after ``drafts[:j]``. The matcher walks the drafts and
        is rolled back, so its state is unchanged. Returns the rows that need masking; rows
        past a draft the grammar refuses (or past its end) are not filled: such a draft can
        never be accepted, so nothing sampled after it is kept."""
        rows = []
        walked = 0
        for j in range(len(drafts) + 1):
            if self._matcher.is_terminated():
                break
            if self._matcher.fill_next_token_bitmask(bits, first_row + j):
                rows.append(first_row + j)
            if j == len(drafts) or not self._matcher.accept_token(drafts[j]):
                break
            walked += 1
        if walked:
            self._matcher.rollback(walked)
        return rows

    def fork(self) -> SequenceGrammar:
        """An independent copy at the same position (for a sibling sample, n > 1)."""
        twin = SequenceGrammar(self._matcher.fork())
        twin.done = self.done
        return twin


class StructuredOutputs:
    """Compiles ``StructuredOutput`` specs for one engine and makes per-sequence matchers."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int]
    ) -> None:
        """``tokenizer``: the engine's HF tokenizer; ``vocab_size``: the model's logits width
        (may exceed the tokenizer's vocabulary); ``stop_token_ids``: the engine's EOS ids."""
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None  # built on first use (~0.1 s)
        self._cache: OrderedDict[StructuredOutput, xgr.CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._bits: torch.Tensor | None = None  # reused across steps, grown as needed

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar for ``spec`` (cached). Raises ValueError naming the field if
        the spec is not a valid schema / regex / grammar, or uses what xgrammar lacks."""
        compiled = self._cache.get(spec)
        if compiled is not None:
            self._cache.move_to_end(spec)
            return compiled
        compiler = self._get_compiler()
        try:
            if spec.json_schema is not None:
                compiled = compiler.compile_json_schema(spec.json_schema, any_whitespace=False)
            elif spec.json_object:
                compiled = compiler.compile_json_schema('{"type":"object"}', any_whitespace=False)
            elif spec.regex is not None:
                compiled = compiler.compile_regex(spec.regex)
            elif spec.choice is not None:
                # EBNF string literals take JSON-style escapes.
                alternatives = " | ".join(json.dumps(c) for c in spec.choice)
                compiled = compiler.compile_grammar(f"root ::= {alternatives}")
            else:
                compiled = compiler.compile_grammar(spec.grammar or "")
        except RuntimeError as exc:  # xgrammar reports every parse / conversion error this way
            raise ValueError(f"structured_output.{spec.kind} is invalid: {_reason(exc)}") from None
        self._cache[spec] = compiled
        self._cache_bytes += compiled.memory_size_bytes
        # Evict least recently used; the newest stays (a live sequence holds it anyway).
        while len(self._cache) > 1 and (
            len(self._cache) > _CACHE_SIZE or self._cache_bytes > _CACHE_BYTES
        ):
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.memory_size_bytes
        return compiled

    @property
    def cache_size(self) -> tuple[int, int]:
        """(compiled grammars cached, their bytes)."""
        return len(self._cache), self._cache_bytes

    def start(self, spec: StructuredOutput) -> SequenceGrammar:
        """A matcher at the start of ``spec``'s grammar, for a new sequence."""
        return SequenceGrammar(xgr.GrammarMatcher(self.compile(spec)))

    def fill_bitmask(
        self,
        grammars: Sequence[SequenceGrammar | None],
        drafts: Sequence[Sequence[int]] | None = None,
    ) -> TokenBitmask | None:
        """The next-token masks of a batch (one entry per sequence, None: unconstrained); None
        when no row needs masking. The returned tensor is reused by the next call.

        With ``drafts`` (speculative decoding), sequence i takes ``1 + len(drafts[i])``
        consecutive rows: its masks after each prefix of its drafts (``fill_ahead``)."""
        if all(g is None for g in grammars):
            return None
        if drafts is None:
            bits = self._buffer(len(grammars))
            rows = tuple(
                i for i, g in enumerate(grammars)
                if g is not None and not g.done and g.fill(bits, i)
            )  # fmt: skip
            return TokenBitmask(bits, rows) if rows else None
        bits = self._buffer(sum(1 + len(d) for d in drafts))
        filled: list[int] = []
        row = 0
        for g, d in zip(grammars, drafts, strict=True):
            if g is not None and not g.done:
                filled += g.fill_ahead(bits, row, d)
            row += 1 + len(d)
        return TokenBitmask(bits, tuple(filled)) if filled else None

    def _buffer(self, batch: int) -> torch.Tensor:
        if self._bits is None or self._bits.shape[0] < batch:
            self._bits = xgr.allocate_token_bitmask(max(batch, 8), self.vocab_size)
        return self._bits[:batch]

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer,
                vocab_size=self.vocab_size,
                stop_token_ids=self._stop_token_ids or None,  # None: the tokenizer's EOS
            )
            # Our own cache is keyed by the spec; xgrammar's would hold a second copy.
            self._compiler = xgr.GrammarCompiler(
                info, max_threads=_COMPILE_THREADS, cache_enabled=False
            )
        return self._compiler


def _reason(exc: RuntimeError) -> str:
    """xgrammar's message without its time stamp, C++ source location and failed check."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    # "[00:10:04] /project/cpp/regex_converter.cc:83: Regex parsing error ..."
    head, sep, rest = text.partition(".cc:")
    if sep and head.startswith("["):
        text = rest.split(": ", 1)[-1]
    # "Check failed: (error.empty()) is false: Failed to parse JSON: ..."
    if text.startswith("Check failed:") and " is false: " in text:
        text = text.split(" is false: ", 1)[1]
    return text
