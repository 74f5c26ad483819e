"""Fixtures shared by every test folder: the default model's directory and tiny random models
(built in code, saved as HF checkpoints with the default model's tokenizer)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from splitserve.engine.model.loader import resolve_model

# Helper programs that tests start as processes (tests/fixtures/*.py) import by module name.
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model(None)


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
    torch.manual_seed({"llama": 0, "qwen2": 1, "llama3": 2}[kind])
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, rope_theta=10000.0, **common))
    elif kind == "llama3":  # Llama 3.1-style scaled RoPE
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
        model = LlamaForCausalLM(LlamaConfig(rms_norm_eps=1e-5, rope_parameters=rope, **common))
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
def tiny_llama3_dir(tmp_path_factory, default_model_dir) -> Path:
    return _save_tiny("llama3", tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, default_model_dir) -> Path:
    return _save_tiny("qwen2", tmp_path_factory.mktemp("tiny"), default_model_dir)


@pytest.fixture(scope="session")
def tiny_llama_adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """Three random PEFT adapters for the tiny Llama: all seven modules, attention only (q/v,
    rank 4, rsLoRA), MLP only (rank 16)."""
    from lora_adapters import make_peft_adapter

    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        "all": make_peft_adapter(tiny_llama_dir, root / "all", r=8, alpha=16, seed=1),
        "qv": make_peft_adapter(
            tiny_llama_dir, root / "qv", targets=("q_proj", "v_proj"), r=4, alpha=8, seed=2,
            use_rslora=True,
        ),
        "mlp": make_peft_adapter(
            tiny_llama_dir, root / "mlp", targets=("gate_proj", "up_proj", "down_proj"),
            r=16, alpha=8, seed=3,
        ),
    }  # fmt: skip
