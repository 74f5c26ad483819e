"""LoRA serving limits: frozen, validated once (part of ``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_RANK_LIMIT = 512


@dataclass(frozen=True)
class LoRAConfig:
    """``max_loras``: adapters one step may mix (the resident slots, evicted LRU);
    ``max_lora_rank``: the largest rank accepted (smaller ranks are zero-padded to it);
    ``max_cpu_loras``: registered adapters whose weights stay in host memory (the rest are read
    again from their path when a request needs them); None keeps every registered adapter."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be positive, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= MAX_RANK_LIMIT:
            raise ValueError(
                f"max_lora_rank must be in [1, {MAX_RANK_LIMIT}], got {self.max_lora_rank}"
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras})"
            )
