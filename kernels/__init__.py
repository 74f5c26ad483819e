"""Triton paged-attention kernels over the engine's block-major KV layout, with torch references.

Layout (fixed by the engine): `kv_cache [num_blocks, num_layers, 2, block_size, Hkv, D]`; the
kernels take per-layer views `k_cache = kv_cache[:, layer, 0]` (strided along dim 0) and address a
token as `slot = block_id * block_size + offset`.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`).
`available()` says whether either holds and needs no triton import; the wrappers and their `*_ref`
twins are imported on first use, so `import splitserve.kernels` works where triton is absent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._launch import available, interpret_mode

if TYPE_CHECKING:
    from .cache_write import reshape_and_cache, reshape_and_cache_ref
    from .decode import paged_decode_attention, paged_decode_attention_ref
    from .prefill import paged_prefill_attention, paged_prefill_attention_ref

_LAZY = {
    "reshape_and_cache": "cache_write",
    "reshape_and_cache_ref": "cache_write",
    "paged_decode_attention": "decode",
    "paged_decode_attention_ref": "decode",
    "paged_prefill_attention": "prefill",
    "paged_prefill_attention_ref": "prefill",
}

__all__ = [
    "available",
    "interpret_mode",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
