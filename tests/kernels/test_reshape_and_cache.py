"""reshape_and_cache writes exactly the addressed slots of a per-layer (strided) cache view."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import available, reshape_and_cache, reshape_and_cache_ref

pytestmark = pytest.mark.skipif(not available(), reason="needs CUDA or TRITON_INTERPRET=1")

NUM_LAYERS, LAYER = 3, 2


def _pool(num_blocks, block_size, heads, head_dim, dtype, device, gen):
    shape = (num_blocks, NUM_LAYERS, 2, block_size, heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    ("dtype", "block_size", "heads", "head_dim"),
    [
        (torch.float32, 16, 2, 64),
        (torch.bfloat16, 32, 3, 128),
        (torch.bfloat16, 16, 1, 80),  # head_dim and head count not powers of two
    ],
)
def test_matches_reference_and_skips_padding(paged, dtype, block_size, heads, head_dim, slot_dtype):
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim)
    device = paged.device
    num_blocks, num_tokens = 9, 37
    kv = _pool(num_blocks, block_size, heads, head_dim, dtype, device, gen)
    before = kv.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1  # padding tokens
    slots = slots.to(slot_dtype).to(device)
    key = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype).to(device)
    value = torch.randn(num_tokens, heads, head_dim, generator=gen).to(dtype).to(device)

    reshape_and_cache(key, value, kv[:, LAYER, 0], kv[:, LAYER, 1], slots)

    expected = before.clone()
    reshape_and_cache_ref(key, value, expected[:, LAYER, 0], expected[:, LAYER, 1], slots)
    assert torch.equal(kv, expected)
    # And directly: written rows hold the inputs bit-exactly, everything else is unchanged.
    keep = slots >= 0
    blk, off = slots[keep].long() // block_size, slots[keep].long() % block_size
    assert torch.equal(kv[blk, LAYER, 0, off], key[keep])
    assert torch.equal(kv[blk, LAYER, 1, off], value[keep])
    untouched = torch.ones(num_blocks, NUM_LAYERS, 2, block_size, dtype=torch.bool, device=device)
    untouched[blk, LAYER, :, off] = False
    assert torch.equal(kv[untouched], before[untouched])
    assert int((~untouched).sum()) == 2 * int(keep.sum())


def test_strided_key_value_views(paged):
    # key as a slice of a fused qkv projection output (strided along tokens, offset storage),
    # value with other strides again: each must be addressed with its own.
    gen = torch.Generator().manual_seed(8)
    kv = _pool(4, 16, 2, 64, torch.float32, paged.device, gen)
    qkv = torch.randn(10, 8, 64, generator=gen).to(paged.device)
    key = qkv[:, 4:6]
    value = torch.randn(2, 10, 64, generator=gen).to(paged.device).transpose(0, 1)
    slots = torch.arange(10, device=paged.device) * 5
    expected = kv.clone()
    reshape_and_cache(key, value, kv[:, 0, 0], kv[:, 0, 1], slots)
    reshape_and_cache_ref(key, value, expected[:, 0, 0], expected[:, 0, 1], slots)
    assert torch.equal(kv, expected)


def test_rejects_mismatched_arguments(paged):
    kv = torch.zeros(4, 1, 2, 16, 2, 64, device=paged.device)
    k, v = kv[:, 0, 0], kv[:, 0, 1]
    key = torch.zeros(3, 2, 64, device=paged.device)
    slots = torch.arange(3, device=paged.device)
    with pytest.raises(ValueError, match="do not match"):
        reshape_and_cache(key[:, :1], key[:, :1], k, v, slots)
    with pytest.raises(TypeError, match="must match"):
        reshape_and_cache(key.bfloat16(), key.bfloat16(), k, v, slots)
    with pytest.raises(ValueError, match="entries"):
        reshape_and_cache(key, key, k, v, slots[:2])
    with pytest.raises(TypeError, match="slot_mapping dtype"):
        reshape_and_cache(key, key, k, v, slots.float())
    with pytest.raises(ValueError, match="stride 1"):
        reshape_and_cache(key, key, k.transpose(2, 3).contiguous().transpose(2, 3), v, slots)
