"""Frozen engine configuration, validated once at construction and never mutated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.lora.config import LoRAConfig
from splitserve.protocol.kv_compat import QUANTIZATIONS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}


def _auto_dtype(device: str) -> torch.dtype:
    from splitserve.engine.cpu_features import native_bf16

    return torch.bfloat16 if device != "cpu" or native_bf16() else torch.float32


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Map a dtype name to torch. 'auto' picks bf16 where the CPU has native bf16 matmuls (and on
    GPUs), float32 on CPUs without them (bf16 is emulated there, ~3x slower). fp16 is refused on
    the CPU (it is ~1000x slower than bf16 there)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        if dtype not in _DTYPES and dtype not in ("float16", "half", "fp32", "bf16", "float"):
            raise ValueError(f"dtype must be one of float32, bfloat16, auto; got {dtype!r}")
        alias = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
        if alias in ("float16", "half"):
            resolved = torch.float16
        else:
            resolved = _DTYPES[alias] or _auto_dtype(device)
    if resolved == torch.float16 and device == "cpu":
        raise ValueError("dtype float16 is not supported on the CPU; use bfloat16 or float32")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {resolved}")
    return resolved


@dataclass(frozen=True)
class ModelShape:
    """The facts of a decoder that the KV cache and the compatibility hash depend on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 2 << 30
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two <= 128, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # A request still waiting for its first step after this long is dropped with an error
    # (servers answer "overloaded"); None: wait as long as it takes (the offline LLM).
    # Preempted requests were served already and are never dropped.
    max_queue_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_queue_seconds is not None and not self.max_queue_seconds > 0:
            raise ValueError(f"max_queue_seconds must be positive, got {self.max_queue_seconds}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default model
    revision: str | None = None  # hub revision, for hub ids
    dtype: str = "auto"
    device: str = "cpu"
    # "cpu" | "torch" | "triton" | "auto" (cpu where its C++ kernel builds, else torch; on CUDA
    # triton)
    attention_backend: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    # None: weights in `dtype`; else one of QUANTIZATIONS (weights stay quantized at run time)
    quantization: str | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig | None = None  # None: no LoRA adapters (and no per-step cost)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None); "
                f"got {self.quantization!r}"
            )
        if self.quantization is not None and self.device != "cpu":
            raise ValueError(
                f"quantization {self.quantization!r} runs on the CPU only (its kernels are C++ "
                f"CPU kernels); device is {self.device!r}"
            )
        if self.attention_backend not in ("auto", "cpu", "torch", "triton"):
            raise ValueError(
                "attention_backend must be auto, cpu, torch or triton; "
                f"got {self.attention_backend!r}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        parse_dtype(self.dtype, self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.device)
