"""The attention-backend interface: one object per engine, one prepared step per forward pass."""

from __future__ import annotations

from typing import Protocol

import torch

from splitserve.engine.attention.metadata import AttentionMetadata


class AttentionStep(Protocol):
    """Attention for one forward pass; holds whatever the backend precomputed for the batch."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D]) into the cache, attend q ([T, Hq, D]), return [T, Hq, D]."""
        ...


class AttentionBackend(Protocol):
    name: str

    def prepare(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> AttentionStep:
        """Precompute per-step state once (masks, gather indices) for all layers."""
        ...


def k_cache_view(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    """[num_blocks, block_size, H_kv, D] view of one layer's K (strided along blocks)."""
    return kv_cache[:, layer, 0]


def v_cache_view(kv_cache: torch.Tensor, layer: int) -> torch.Tensor:
    return kv_cache[:, layer, 1]
