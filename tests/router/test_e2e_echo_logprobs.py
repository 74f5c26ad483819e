"""Completions with ``echo`` and ``logprobs`` through real stacks and the official `openai` SDK:
the prompt's tokens come back with their logprobs (null for the first token, as OpenAI sends),
computed by the prefill pod (disaggregated) or the engine itself (colocated), equal to the
offline engine's ``prompt_logprobs``."""

from __future__ import annotations

import openai
import pytest

from splitserve import LLM, SamplingParams

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def oracle() -> LLM:
    return LLM(kv_cache_memory_bytes=64 << 20, max_num_seqs=8)


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def sdk(request, serve_factory):
    args = ["--prefill-replicas", "1", "--decode-replicas", "1"]
    if request.param == "colocated":
        args = ["--colocated", "--decode-replicas", "1"]
    stack = serve_factory(args)
    yield openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    assert stack.stop() == 0


def test_echo_returns_prompt_logprobs(sdk, oracle):
    want = oracle.generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    )[0]
    n_prompt = len(want.prompt_token_ids)
    r = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT)
    assert len(lp.tokens) == n_prompt + 4
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0
    assert all(
        b - a == len(t)
        for a, b, t in zip(lp.text_offset[:-1], lp.text_offset[1:], lp.tokens[:-1], strict=True)
    )
    ref = [p.logprob for p in want.prompt_logprobs[1:]] + [
        p.logprob for p in want.outputs[0].logprobs
    ]
    for got, exp in zip(lp.token_logprobs[1:], ref, strict=True):
        assert got == pytest.approx(exp, abs=0.2)  # bf16: batch shapes differ, not more
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])

    # Streaming: the echoed prompt arrives in one chunk with its logprobs, then the tokens.
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True,
            stream=True,
        )
    )  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == PROMPT and "".join(texts) == choice.text
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[0] is None and len(first.tokens) == n_prompt
    streamed = [x for c in chunks if c.choices for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)

    # Without echo: no prompt entries (and the engines are not asked for them).
    plain = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    assert len(plain.choices[0].logprobs.tokens) == 4
