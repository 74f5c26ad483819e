"""Greedy output must equal HF transformers token for token (float32)."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Explain why the sky is blue in one sentence.",
    "Écris une phrase en français sur la mer :",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
    "Q: What is 12 times 12?\nA:",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12),
]


@pytest.mark.model
def test_default_model_matches_hf_in_one_concurrent_batch(default_llm, hf_default_model, hf_greedy):
    max_new = 16
    # min_tokens masks EOS exactly like HF's min_new_tokens, so both run the full length.
    params = SamplingParams(temperature=0.0, max_tokens=max_new, min_tokens=max_new)
    outputs = default_llm.generate(PROMPTS, params)  # one call: all prompts share the batch
    assert len({len(o.prompt_token_ids) for o in outputs}) > 5, "prompts must have mixed lengths"
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        expected = hf_greedy(hf_default_model, out.prompt_token_ids, max_new)
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].finish_reason == "length"
    default_llm.engine.check_integrity()


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
def test_tiny_random_models_match_hf(kind, request, hf_greedy):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    llm = LLM(model=str(model_dir), dtype="float32", num_kv_blocks=64, block_size=8)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # one prompt runs past llama3's original_max_position_embeddings (128): scaled RoPE matters
    prompts = [[5, 17, 300, 9000, 44], list(range(100, 137)), [7] * 19, [1, 2], list(range(3, 203))]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)
    llm.engine.check_integrity()
