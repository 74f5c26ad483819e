"""Our own Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV cache.

The forward pass works on the flattened batch: every new token of every scheduled sequence in one
``[T, hidden]`` tensor, so each linear layer is one matmul for the whole step. Q/K/V and gate/up
projections are fused at load time. Attention goes through the engine's backend (``AttentionStep``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention.base import AttentionStep
from splitserve.engine.cpu_features import native_bf16
from splitserve.kernels import cpu as cpu_kernels
from splitserve.kernels.cpu import fused

if TYPE_CHECKING:
    from splitserve.engine.lora.slots import LayerLoRA, LoRAStep


@dataclass(frozen=True)
class LlamaArch:
    """The architecture facts read from a HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool
    tie_word_embeddings: bool
    model_type: str
    sliding_window: int | None = None  # None: full attention at every layer

    @classmethod
    def from_hf_config(cls, config: Any) -> LlamaArch:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        model_type = getattr(config, "model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r} (llama, mistral, qwen2)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        if getattr(config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        window = getattr(config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            qkv_bias=qkv_bias,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            model_type=model_type,
            sliding_window=window,
        )


def rope_inv_freq(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type (default, llama3,
    linear, dynamic, yarn ... via transformers' own initialisers)."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with torch.device("cpu"):  # real numbers even while the model is built on "meta"
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = False  # one C++ op (kernels/cpu/fused.py) instead of six torch ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused.rms_norm(x, self.weight, self.eps)
        # Same order of operations as HF so fp32 results match bit for bit where possible.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual += x`` in place (HF's residual connection, rounded in the dtype), then
        the norm of the new residual."""
        if self.fused:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual.add_(x)
        return self(residual)


# The most rows a linear layer sends through the dense C++ kernel (``kernels/cpu/dense_linear.cpp``)
# rather than torch's matmul, by weight dtype; measured with bench/quant_linear.py --dense on the
# 2-core Xeon, weights not in cache. float32: MKL's sgemm reads the weights at 4-6 GB/s at 2-16 rows
# where the kernel reads 9-11 (one row: the same); from ~32 rows both are bound by arithmetic. bf16
# on a CPU without native bf16: torch emulates bf16 matmuls (~1 GB/s at 32 rows); the kernel wins up
# to ~64 rows, and larger counts run faster as a float32 matmul (``Linear.upcast``).
DENSE_ROWS = {torch.float32: 16, torch.bfloat16: 64}


class Linear(nn.Linear):
    """``nn.Linear`` whose small row counts (decode steps) can run through the dense C++ kernel:
    ``dense_rows`` is the most rows sent there (0: none); with ``upcast`` (a bf16 weight on a CPU
    without native bf16) larger counts run as a float32 matmul, the result rounded back to bf16.
    Both are set by ``LlamaForCausalLM.use_cpu_kernels``; the weight stays the ``nn.Linear`` one."""

    dense_rows = 0
    upcast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.dense_rows:
            return cpu_kernels.dense_linear(x, self.weight, self.bias)
        if self.upcast:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class Rotary(nn.Module):
    """cos/sin tables computed once for every position; a step gathers rows by position."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int) -> None:
        super().__init__()
        self._inv_freq = inv_freq.detach().to("cpu", torch.float32)
        self._scaling = scaling
        self._max_positions = max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.rebuild("cpu")

    def rebuild(self, device: str | torch.device) -> None:
        """(Re)compute the fp32 tables, e.g. after the module was materialised from ``meta``."""
        t = torch.arange(self._max_positions, dtype=torch.float32, device="cpu")
        emb = torch.outer(t, self._inv_freq).repeat(1, 2)
        self.cos = (emb.cos() * self._scaling).to(device)
        self.sin = (emb.sin() * self._scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def padded_rows(t: int) -> int:
    """The row count a step of `t` tokens runs its matmuls at: `t` itself up to 32 (decode
    batches), above that `t` rounded up to one of 8 steps per power of two (at most 12.5% extra
    rows). 8,192 tokens take 96 distinct shapes in all."""
    if t <= 32:
        return t
    step = 1 << (t.bit_length() - 4)
    return -(-t // step) * step


def logit_rows(n: int) -> int:
    """The row count the LM head runs ``n`` rows at: ``n`` up to 8, then the next power of two.
    Coarser than ``padded_rows``: each LM-head shape costs oneDNN ~2.6 MB here (its weight is
    the largest), and extra rows cost little next to reading that weight."""
    return n if n <= 8 else 1 << (n - 1).bit_length()


def row_buckets(limit: int, rows=padded_rows) -> list[int]:
    """Every row count ``rows`` gives for 1 to ``limit``."""
    return sorted({rows(t) for t in range(1, limit + 1)})


class Attention(nn.Module):
    def __init__(self, arch: LlamaArch, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.qkv_proj = Linear(arch.hidden_size, (self.hq + 2 * self.hkv) * self.d, arch.qkv_bias)
        self.o_proj = Linear(self.hq * self.d, arch.hidden_size, bias=False)
        self.fused = False

    def forward(
        self, x, cos, sin, attn: AttentionStep, t: int, lora: LayerLoRA | None = None
    ) -> torch.Tensor:
        """x: [rows, hidden] with the step's `t` tokens first and padding rows after them
        (`padded_rows`); attention sees the `t` tokens only. ``lora``: the step's adapter
        updates, added after each base projection."""
        rows = x.shape[0]
        qkv = self.qkv_proj(x)
        if lora is not None:
            qkv = lora.apply("qkv", x, qkv)
        qkv = qkv[:t]
        qk, v = qkv.split([(self.hq + self.hkv) * self.d, self.hkv * self.d], dim=-1)
        # Rotate q and k heads together: one set of elementwise ops instead of two.
        if self.fused:  # in place, in the projection's output
            qk = qk.view(t, self.hq + self.hkv, self.d)
            fused.rotary_(qk, cos, sin)
        else:
            qk = apply_rotary(qk.reshape(t, self.hq + self.hkv, self.d), cos[:t], sin[:t])
        q, k = qk.split([self.hq, self.hkv], dim=1)
        out = attn(self.layer, q, k, v.reshape(t, self.hkv, self.d)).reshape(t, self.hq * self.d)
        if rows > t:
            out = F.pad(out, (0, 0, 0, rows - t))
        if lora is not None:
            return lora.apply("o", out, self.o_proj(out))
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.inter = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = Linear(self.inter, arch.hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor, lora: LayerLoRA | None = None) -> torch.Tensor:
        if lora is None:
            if self.fused:
                return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))
            gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        gate_up = lora.apply("gate_up", x, self.gate_up_proj(x))
        if self.fused:
            h = fused.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.inter, dim=-1)
            h = F.silu(gate) * up
        return lora.apply("down", h, self.down_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(
        self,
        x,
        residual: torch.Tensor | None,
        cos,
        sin,
        attn: AttentionStep,
        t: int,
        lora: LoRAStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at layer 0, with ``residual``
        None); ``residual``: the residual stream, which this layer adds x to in place. Returns
        (this layer's MLP output, the residual stream): the add is deferred into the next norm
        so that it fuses with it."""
        own = None if lora is None else lora.layer(self.self_attn.layer)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm.add(x, residual)
        h = self.self_attn(h, cos, sin, attn, t, own)
        h = self.post_attention_layernorm.add(h, residual)
        return self.mlp(h, own), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: LlamaArch, hf_config: Any) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, scaling = rope_inv_freq(hf_config, arch.head_dim)
        self.rotary = Rotary(inv_freq, scaling, arch.max_position_embeddings)
        self.scale = 1.0 / math.sqrt(arch.head_dim)
        self.bucket_rows = False  # pad matmul rows to a fixed set of shapes (see ``forward``)

    def use_cpu_kernels(self, enabled: bool = True) -> None:
        """Run norms, rotary, SiLU*up (and, in the cpu attention backend, the K/V write) as the
        single C++ ops of ``kernels/cpu/fused.py`` instead of chains of torch ops. The engine
        turns this on for CPU models where the kernels load; the torch code stays the
        reference and the fallback.

        Linear layers with float32 weights, and bf16 ones on CPUs without native bf16, also run
        decode-sized row counts through the dense kernel (``DENSE_ROWS``); those bf16 layers run
        larger counts as float32 matmuls (``Linear.upcast``). On CPUs with native bf16, bf16
        layers stay on oneDNN, the faster there."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = enabled
            elif isinstance(module, Linear):
                dtype = module.weight.dtype
                emulated = dtype == torch.bfloat16 and not native_bf16()
                use = enabled and (dtype == torch.float32 or emulated)
                module.dense_rows = DENSE_ROWS[dtype] if use else 0
                module.upcast = enabled and emulated

    def tie_weights(self) -> None:
        """Share the embedding with the LM head (again after ``to_empty``, which unties them)."""
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionStep,
        lora: LoRAStep | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; returns the final hidden states [T, hidden]. ``lora``:
        the step's LoRA adapters (one per token, or none), built once by the runner.

        With ``bucket_rows`` the linear layers run on `padded_rows(T)` rows (the tokens, then
        zero rows): oneDNN, which runs torch's bf16/fp16 matmuls on the CPU, keeps state for every
        matmul shape it has run (primitives, JIT code; ~0.7-1 MB each here), so an engine that saw
        every prompt length would grow by hundreds of MB. With the rows rounded up the shapes are
        a small fixed set, made once by ``warm_up``. (float32 goes through MKL, which keeps no
        such state: no padding there.)"""
        t = input_ids.shape[0]
        rows = padded_rows(t) if self.bucket_rows else t
        if rows > t:
            input_ids = F.pad(input_ids, (0, rows - t))
            positions = F.pad(positions, (0, rows - t))
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        if lora is not None:
            lora = lora.for_rows(rows)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn, t, lora)
        return self.norm.add(x[:t], residual[:t])

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        padded = logit_rows(rows) if self.bucket_rows else rows
        if padded > rows:
            return self.lm_head(F.pad(hidden, (0, 0, 0, padded - rows)))[:rows].float()
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def warm_up(self, max_tokens: int, max_logit_rows: int) -> None:
        """Run every matmul shape the engine can meet once, at start: each linear layer's weight
        shape at every ``padded_rows`` count up to ``max_tokens`` (the step's token budget), the
        LM head up to ``max_logit_rows``. oneDNN builds its per-shape state now, so an engine's
        memory is flat under load instead of growing as new prompt lengths arrive."""
        by_shape: dict[tuple[int, ...], nn.Module] = {}
        for module in self.layers.modules():
            if hasattr(module, "in_features"):  # nn.Linear and the quantized linears
                by_shape.setdefault((module.out_features, module.in_features), module)
        like = self.norm.weight  # the model dtype and device
        for rows in row_buckets(max_tokens):
            for linear in by_shape.values():
                linear(like.new_zeros(rows, linear.in_features))
        for rows in row_buckets(max_logit_rows, logit_rows):
            self.lm_head(like.new_zeros(rows, self.arch.hidden_size))

    # --- weights ---------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Raises on missing or extra names."""
        self.tie_weights()
        params = dict(self.named_parameters())
        fused = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        loaded: set[str] = set()
        q_size = self.arch.num_heads * self.arch.head_dim
        kv_size = self.arch.num_kv_heads * self.arch.head_dim
        qkv_sizes = [q_size, kv_size, kv_size]
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            target, shard = name, None
            for part, idx in fused.items():
                if f".{part}." in name:
                    new = "qkv_proj" if part in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
                    target, shard = name.replace(part, new), idx
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            param = params[target]
            with torch.no_grad():
                if shard is None:
                    param.copy_(tensor)
                else:
                    sizes = qkv_sizes if "qkv_proj" in target else [self.arch.intermediate_size] * 2
                    start = sum(sizes[:shard])
                    param[start : start + sizes[shard]].copy_(tensor)
            loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            if "qkv_proj.weight" in pname or "qkv_proj.bias" in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif "gate_up_proj" in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            elif pname == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            else:
                expected.add(f"{pname}#None")
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")
