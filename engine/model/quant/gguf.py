"""A llama-architecture GGUF file's weights in the model, without dequantizing them.

Q4_0 / Q4_1 / Q8_0 tensors become ``BlockLinear`` layers holding the file's quantized bytes
(Q/K/V and gate/up fused by stacking rows: GGUF blocks run along a row, so rows concatenate);
F32 / F16 / BF16 tensors (norms, any unquantized projection) load as dense weights. Other GGML
types (the K-quants, ...) are refused with their names: ``--quantization int8`` runs such files
from the dequantized copy instead.

llama.cpp's converter permutes the rows of Q and K (``permute`` in convert_hf_to_gguf.py: each
head's rotary halves interleaved); transformers undoes it when it dequantizes, and so do we, by
reordering whole rows (``_unpermute_index``), which leaves the blocks themselves untouched.

Parsing a GGUF file with gguf-py takes seconds (it walks every vocabulary string), so the packed
weights are written once to a safetensors file in the model cache (keyed by the file's path,
size and mtime) and read from there afterwards, like the dequantized conversion in loader.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splitserve.engine.model.quant.linear import BlockLinear, QuantEmbedding
from splitserve.kernels.cpu import quant

_DENSE = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16
_BLOCKS = {quant.GGML_Q4_0: "Q4_0", quant.GGML_Q4_1: "Q4_1", quant.GGML_Q8_0: "Q8_0"}
# GGUF tensor name (per layer: after "blk.{i}.") -> (our module path, fused shard)
_LAYER = {
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", 0),
}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_CACHE_VERSION = 1


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns llama.cpp's permuted Q/K rows back into HF's: GGUF row r holds
    HF row ``perm[r]``, so HF row i is GGUF row ``argsort(perm)[i]``."""
    perm = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
    return torch.argsort(perm)


class _Tensor:
    """One GGUF tensor, checked to be a type we read."""

    def __init__(self, reader_tensor) -> None:
        self.name = reader_tensor.name
        self.type = int(reader_tensor.tensor_type)
        # GGUF lists the fastest dimension first: [in_features, out_features].
        self.shape = tuple(int(s) for s in reversed(reader_tensor.shape.tolist()))
        self.data = reader_tensor.data
        if self.type not in _BLOCKS and self.type not in _DENSE:
            raise ValueError(
                f"GGUF tensor {self.name} has GGML type {reader_tensor.tensor_type.name}: "
                f"--quantization gguf runs {', '.join(_BLOCKS.values())}, F32, F16 and BF16 "
                "tensors (use --quantization int8 for other files)"
            )

    @property
    def quantized(self) -> bool:
        return self.type in _BLOCKS

    def blocks(self, row_order: torch.Tensor | None = None) -> quant.BlockWeights:
        packed = quant.pack_gguf(self.data, self.type, self.shape[-1])
        return packed if row_order is None else packed.rows(row_order)

    def dense(self, row_order: torch.Tensor | None = None) -> torch.Tensor:
        if self.quantized:  # a dense target given a quantized tensor (mixed fused pieces)
            w = self.blocks().dequantize()
        else:
            array = torch.from_numpy(self.data.copy())
            if self.type == 30:  # numpy has no bf16: the reader hands raw 16-bit words
                array = array.view(torch.bfloat16)
            w = array.to(torch.float32).reshape(self.shape)
        return w if row_order is None else w[row_order]


def read_gguf(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Parse the file into a flat dict in our module names: ``{module}.qs/.d/.m/.bits/
    .in_features/.ggml_type`` for block layers, ``{param}`` for dense tensors."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "?"
    if arch != "llama":
        raise ValueError(f"--quantization gguf reads llama-architecture files; {path} is {arch!r}")
    tensors = {t.name: _Tensor(t) for t in reader.tensors}
    layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    out: dict[str, torch.Tensor] = {}
    heads = {"attn_q": num_heads, "attn_k": num_kv_heads}
    for i in range(layers):
        pieces: dict[str, list[tuple[_Tensor, torch.Tensor | None]]] = {}
        for name, (target, _) in _LAYER.items():
            t = tensors.pop(f"blk.{i}.{name}.weight", None)
            if t is None:
                raise ValueError(f"{path.name} lacks blk.{i}.{name}.weight")
            order = _unpermute_index(t.shape[0], heads[name]) if name in heads else None
            pieces.setdefault(f"layers.{i}.{target}", []).append((t, order))
        for target, parts in pieces.items():
            _put_linear(out, target, parts)
        for name, target in _NORMS.items():
            out[f"layers.{i}.{target}.weight"] = tensors.pop(f"blk.{i}.{name}.weight").dense()
    out["norm.weight"] = tensors.pop("output_norm.weight").dense()
    embed = tensors.pop("token_embd.weight")
    output = tensors.pop("output.weight", None)
    _put_linear(out, "lm_head" if output is None else "embed_tokens", [(embed, None)])
    if output is not None:
        _put_linear(out, "lm_head", [(output, None)])
    extra = sorted(k for k in tensors if "rope_freqs" not in k)
    if extra:
        raise ValueError(f"{path.name} has tensors the model does not use: {extra[:5]}")
    return out


def _put_linear(out: dict[str, torch.Tensor], target: str, parts) -> None:
    """Fused pieces of one type stay blocks (rows concatenated); anything else goes dense."""
    types = {t.type for t, _ in parts}
    if len(types) == 1 and parts[0][0].quantized:
        packed = [t.blocks(order) for t, order in parts]
        out[f"{target}.qs"] = torch.cat([p.qs for p in packed])
        out[f"{target}.d"] = torch.cat([p.d for p in packed])
        out[f"{target}.m"] = torch.cat([p.m for p in packed])
        out[f"{target}.bits"] = torch.tensor(packed[0].bits)
        out[f"{target}.in_features"] = torch.tensor(packed[0].in_features)
        out[f"{target}.ggml_type"] = torch.tensor(parts[0][0].type)
    else:
        out[f"{target}.weight"] = torch.cat([t.dense(order) for t, order in parts])


def cached_gguf(path: Path, num_heads: int, num_kv_heads: int, cache: Path) -> dict:
    """``read_gguf`` once per file identity, then from a safetensors copy under ``cache``."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_VERSION}"
    file = cache / f"gguf-packed-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if file.is_file():
        return load_file(str(file))
    weights = read_gguf(path, num_heads, num_kv_heads)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=file.name + ".")
    os.close(fd)
    try:  # written aside and renamed: a crash never leaves half a file under the final name
        save_file(weights, tmp, metadata={"source": json.dumps(str(path))})
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return weights


def install(model: nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Put the weights into the (materialised) model: block layers replace its projections,
    dense tensors are copied in. Returns {module: "Q4_1" | "Q8_0" | ... | "dense"}."""
    kinds: dict[str, str] = {}
    blocks = {k.removesuffix(".qs") for k in weights if k.endswith(".qs")}
    for target in sorted(blocks):
        packed = quant.BlockWeights(
            weights[f"{target}.qs"],
            weights[f"{target}.d"],
            weights[f"{target}.m"],
            int(weights[f"{target}.bits"]),
            int(weights[f"{target}.in_features"]),
        )
        layer = BlockLinear(packed)
        kinds[target] = _BLOCKS[int(weights[f"{target}.ggml_type"])]
        if target == "embed_tokens":  # an untied, quantized embedding table
            model.embed_tokens = QuantEmbedding(layer, dtype)
            continue
        owner, _, leaf = target.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, layer)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    for name, tensor in weights.items():
        if name.endswith(".weight"):
            params[name].data.copy_(tensor)
            kinds.setdefault(name.removesuffix(".weight"), "dense")
    tied = "lm_head.qs" in weights and "embed_tokens.qs" not in weights
    if tied and "embed_tokens.weight" not in weights:
        model.embed_tokens = QuantEmbedding(model.lm_head, dtype)
    elif "lm_head.weight" in weights and "embed_tokens.weight" not in weights:
        model.tie_weights()  # a dense, tied table
    return kinds
