"""Speculative decoding through the whole stack: `splitserve serve --speculative-config` (the decode
pod speculates after a KV hand-off) and `--performance-mode interactivity --colocated`, driven
by the official `openai` SDK. Greedy output must equal the offline engine without speculation
(with the same weights: interactivity runs int8 weights, so its reference does too);
the decode engine must report drafts and acceptances in vLLM's metrics; streams carry several
tokens in one chunk when a step accepted drafts (the per-token path outside the engine)."""

from __future__ import annotations

import json

import openai
import pytest

from splitserve import LLM, SamplingParams

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}  # fmt: skip
# Prompts whose continuations copy from the prompt, so n-gram drafts are accepted.
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\ndef fib2(n):",
    "1, 2, 3, 4, 5, 6,",
]
CHAT = [{"role": "user", "content": "Repeat exactly: the cat sat on the mat, the cat sat on "
         "the mat, the cat sat on the mat."}]  # fmt: skip


# stack -> (serve flags, the quantization its engines run: the mode's for interactivity)
STACKS = {
    "disaggregated": (["--speculative-config", json.dumps(SPEC)], None),
    "colocated-interactivity": (["--colocated", "--performance-mode", "interactivity"], "int8"),
}


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request, serve_factory):
    s = serve_factory(STACKS[request.param][0])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def oracles() -> dict:
    return {}


@pytest.fixture
def oracle(request, stack, oracles) -> LLM:
    """The offline engine without speculation, with the weights the stack's engines run."""
    quantization = STACKS[request.node.callspec.params["stack"]][1]
    if quantization not in oracles:
        oracles[quantization] = LLM(
            kv_cache_memory_bytes=64 << 20, max_num_seqs=8, quantization=quantization
        )
    return oracles[quantization]


def _spec_counts(stack) -> tuple[float, float]:
    m = stack.engine_metrics("decode-0")
    drafts = sum(v for k, v in m.items() if k.startswith("vllm:spec_decode_num_draft_tokens"))
    accepted = sum(
        v for k, v in m.items()
        if k.startswith("vllm:spec_decode_num_accepted_tokens_total")
    )  # fmt: skip
    return drafts, accepted


def test_greedy_output_equals_plain_decoding_and_drafts_are_counted(stack, oracle):
    sdk = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    want = [o.outputs[0].text for o in oracle.generate(PROMPTS, params)]
    got = [
        sdk.completions.create(model=MODEL, prompt=p, max_tokens=32, temperature=0).choices[0].text
        for p in PROMPTS
    ]
    assert got == want
    chat_want = oracle.chat(CHAT, params)[0].outputs[0].text
    stream = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_want
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    # accepted drafts arrive together: fewer chunks than tokens
    assert len(content_chunks) < chunks[-1].usage.completion_tokens
    drafts, accepted = _spec_counts(stack)
    assert 0 < accepted < drafts
    per_pos = stack.engine_metrics("decode-0")
    assert any(k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos") for k in per_pos)
