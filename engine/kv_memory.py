"""Host memory for the KV pool: one anonymous mapping backed by transparent huge pages.

Decode attention reads every sequence's blocks from scattered places in the pool each step; with
4 KiB pages that is a TLB miss per block slab, with 2 MiB pages a few per step (decode attention
~10% faster here). Kernel-assisted copies (UCX's CMA) gain more: they pin and walk pages one by
one (see docs/protocol.md, "NIXL tuning").
"""

from __future__ import annotations

import math
import mmap

import torch


def allocate_host_kv(
    shape: tuple[int, ...], dtype: torch.dtype, prefault: bool = True
) -> torch.Tensor:
    """A zeroed CPU tensor of ``shape`` on ``MADV_HUGEPAGE`` memory. ``prefault`` touches every
    page now, so neither the first step nor the first transfer pays the page faults."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer keeps a reference to `buf`, so the mapping lives as long as the tensor.
    tensor = torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)
    if prefault:
        tensor.view(torch.uint8).zero_()
    return tensor
