"""Shared engine fixtures: the default model (fp32, for HF parity) and tiny random models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from splitserve.services.engine.model.loader import resolve_model


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="session")
def default_llm():
    """SmolLM2 in float32 with a modest pool: shared by the tests that need the real model."""
    from splitserve import LLM

    return LLM(dtype="float32", num_kv_blocks=512, max_num_seqs=64)


@pytest.fixture(scope="session")
def hf_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _save_tiny(kind: str, root: Path, default_model_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.5,  # peaky logits: greedy argmax far from ties
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=kind == "qwen2",
    )
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(rms_norm_eps=1e-6, rope_theta=1e6, **common))
    out = root / kind
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_model_dir) -> Path:
    return _save_tiny("qwen2", tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="session")
def hf_greedy():
    return _hf_greedy


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers generate(), greedy, one prompt at a time: the correctness oracle."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=2,
        )
    return out[0, ids.shape[1] :].tolist()
