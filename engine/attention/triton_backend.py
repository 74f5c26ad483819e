"""The GPU path: Triton kernels reading K/V straight from the paged pool.

On the CPU it runs only under ``TRITON_INTERPRET=1`` (tests prove correctness that way); the
torch backend is the CPU fast path.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention.base import k_cache_view, v_cache_view
from splitserve.engine.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    name = "triton"

    def __init__(self) -> None:
        from splitserve import kernels

        if not kernels.available():
            raise RuntimeError(
                "the triton attention backend needs CUDA, or TRITON_INTERPRET=1 on the CPU"
            )
        self.kernels = kernels

    def prepare(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> _TritonAttentionStep:
        return _TritonAttentionStep(self.kernels, kv_cache, meta)


class _TritonAttentionStep:
    def __init__(self, kernels, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        self.k = kernels
        self.kv_cache = kv_cache
        self.meta = meta

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        meta = self.meta
        k_cache = k_cache_view(self.kv_cache, layer)
        v_cache = v_cache_view(self.kv_cache, layer)
        self.k.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        scale = q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            self.k.paged_decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_seq_lens,
                scale,
                out=out[:nd],
                max_seq_len=meta.decode_max_seq_len,
            )
        if meta.num_prefill_tokens:
            self.k.paged_prefill_attention(
                q[nd:],
                k_cache,
                v_cache,
                meta.prefill_block_tables,
                meta.prefill_query_start_loc,
                meta.prefill_seq_lens,
                scale,
                out=out[nd:],
                max_query_len=meta.prefill_max_query_len,
            )
        return out
