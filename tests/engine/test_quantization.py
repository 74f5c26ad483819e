"""Quantized weights in the engine: the same numbers as HF running the same quantized weights,
GGUF blocks loaded as the file has them, and the configuration errors a user can make."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from splitserve import LLM, SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.model.loader import iter_safetensors
from splitserve.engine.model.quant import BlockLinear, Int8Linear, W8A8Linear
from splitserve.kernels import cpu
from splitserve.kernels.cpu import quant

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ CPU kernels could not be built")

PROMPTS = [[5, 17, 300, 9000, 44], list(range(100, 137)), [7] * 19, [1, 2], list(range(3, 90))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10, logprobs=0)


def _hf_with_int8_weights(model_dir):
    """HF's model with every projection (and the LM head) replaced by what int8 packing keeps:
    the oracle for the engine's weight-only int8 path."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(quant.pack_int8(module.weight).dequantize())
    return hf


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: qkv biases, tied embeddings
def test_int8_weight_only_equals_hf_running_the_same_int8_weights(kind, request, hf_greedy):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    llm = LLM(model=str(model_dir), dtype="float32", quantization="int8", num_kv_blocks=64)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 3 * 4 + 1  # 4 projections per layer and the LM head
    hf = _hf_with_int8_weights(model_dir)
    outputs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 10)
    llm.engine.check_integrity()


class _FakeQuantLinear(nn.Module):
    """x quantized per token to int8 and back, then the int8-packed weight: what W8A8 computes,
    in plain float arithmetic (the kernel sums the same products exactly, in integers)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = quant.pack_int8(linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        kp = self.packed.weight.shape[1]
        q, d = quant.quantize_rows(flat, kp, kp)
        xq = (q[:, : flat.shape[1]].float() * d).view(x.shape)
        return nn.functional.linear(xq, self.packed.dequantize(), self.bias)


def test_w8a8_equals_hf_with_fake_quantized_activations(tiny_llama_dir, hf_greedy):
    from transformers import AutoModelForCausalLM

    llm = LLM(model=str(tiny_llama_dir), dtype="float32", quantization="w8a8")
    assert isinstance(llm.engine.model.layers[0].mlp.down_proj, W8A8Linear)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for name, module in list(hf.named_modules()):
        if isinstance(module, nn.Linear):
            owner, _, leaf = name.rpartition(".")
            setattr(hf.get_submodule(owner), leaf, _FakeQuantLinear(module))
    outputs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 10)


@pytest.fixture(scope="module")
def gguf_llm():
    return LLM(dtype="float32", quantization="gguf", num_kv_blocks=256)


@pytest.mark.model
def test_gguf_default_model_runs_the_files_blocks(gguf_llm, default_model_dir):
    """Every projection holds the GGUF file's Q4_1 blocks (the tied LM head its Q8_0 ones), and
    they are the very weights transformers dequantizes the file to, Q/K row order included."""
    model = gguf_llm.engine.model
    ref = dict(iter_safetensors(default_model_dir))
    assert isinstance(model.lm_head, BlockLinear) and model.lm_head.bits == 8
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            assert isinstance(module, BlockLinear) and module.bits == 4
        p = f"model.layers.{i}."
        qkv = torch.cat([ref[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(attn.qkv_proj.dequantize(), qkv)
        assert torch.equal(mlp.down_proj.dequantize(), ref[f"{p}mlp.down_proj.weight"])
    assert torch.equal(model.lm_head.dequantize(), ref["model.embed_tokens.weight"])
    weight_bytes = sum(m.weight_nbytes for m in model.modules() if isinstance(m, BlockLinear))
    assert weight_bytes < 110e6  # ~0.6 byte per weight, against 540 MB in float32


@pytest.mark.model
def test_gguf_default_model_answers_like_float32(gguf_llm, default_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    quantized = gguf_llm.generate(prompts, params)
    reference = default_llm.generate(prompts, params)
    for q, r in zip(quantized, reference, strict=True):
        assert q.outputs[0].token_ids[:3] == r.outputs[0].token_ids[:3]
    gguf_llm.engine.check_integrity()


def test_configuration_errors_name_the_problem(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization must be one of int8, w8a8, gguf"):
        EngineConfig(quantization="fp4")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(quantization="int8", device="cuda")
    with pytest.raises(ValueError, match=r"needs a \.gguf model file"):
        LLM(model=str(tiny_llama_dir), quantization="gguf", num_kv_blocks=8)


def test_server_flag_reaches_the_engine_config():
    from splitserve.services.common.engine_args import add_engine_arguments, engine_config

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_config(parser.parse_args([])).quantization is None
    assert engine_config(parser.parse_args(["--quantization", "w8a8"])).quantization == "w8a8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "fp8"])


def test_lora_deltas_compose_with_int8_weights(tiny_llama_dir, tmp_path, hf_greedy):
    """A LoRA adapter's delta after each int8 projection: equal to HF + PEFT on a base model
    whose weights are the int8 ones (the adapter's own weights stay float32)."""
    from lora_adapters import hf_peft_model, make_peft_adapter

    from splitserve import LoRARequest

    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "a", r=8, alpha=16, seed=3)
    base = _hf_with_int8_weights(tiny_llama_dir)
    base.save_pretrained(tmp_path / "int8-base", safe_serialization=True)
    hf = hf_peft_model(tmp_path / "int8-base", adapter)
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", quantization="int8",
              num_kv_blocks=64, enable_lora=True)  # fmt: skip
    request = LoRARequest("a", 1, str(adapter))
    outs = llm.generate(PROMPTS, GREEDY, lora_request=request)
    plain = llm.generate(PROMPTS, GREEDY)
    for prompt, got, base_out in zip(PROMPTS, outs, plain, strict=True):
        assert got.outputs[0].token_ids == hf_greedy(hf, prompt, 10)
        assert got.outputs[0].token_ids != base_out.outputs[0].token_ids
