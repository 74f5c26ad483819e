"""The fused elementwise ops against the torch code they replace (HF's eager Llama): bf16
bit for bit (the same roundings), float32 to a few ulps (sums in another order)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import cpu
from splitserve.kernels.cpu import fused

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ CPU kernels could not be built")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _same(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.bfloat16:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 200, generator=gen) * 3).to(dtype)
    w = torch.randn(200, generator=gen).to(dtype)
    _same(fused.rms_norm(x, w, 1e-5), fused.rms_norm_ref(x, w, 1e-5))
    residual = torch.randn(6, 200, generator=gen).to(dtype)
    mine, theirs = residual.clone(), residual.clone()
    _same(fused.add_rms_norm(x, mine, w, 1e-6), fused.add_rms_norm_ref(x, theirs, w, 1e-6))
    _same(mine, theirs)  # the residual stream was updated in place, the same way
    assert not torch.equal(mine, residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_and_rotary(dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(5, 2 * 96, generator=gen) * 4).to(dtype)
    _same(fused.silu_mul(gate_up), fused.silu_mul_ref(gate_up))
    # q and k heads as the model has them: a column slice of the qkv projection's output
    qkv = torch.randn(5, 7 * 64, generator=gen).to(dtype)
    qk = qkv[:, : 6 * 64].view(5, 6, 64)
    cos, sin = torch.randn(9, 64, generator=gen).to(dtype), torch.randn(9, 64).to(dtype)
    expected = fused.rotary_ref(qk, cos, sin)
    untouched = qkv[:, 6 * 64 :].clone()
    fused.rotary_(qk, cos, sin)
    _same(qk, expected)
    assert torch.equal(qkv[:, 6 * 64 :], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_fills_exactly_the_slots(dtype) -> None:
    pool = torch.full((6, 3, 2, 4, 2, 8), float("nan"), dtype=dtype)
    expected = pool.clone()
    kv = torch.randn(5, 4 * 8).to(dtype)
    k, v = kv[:, :16].view(5, 2, 8), kv[:, 16:].view(5, 2, 8)
    slots = torch.tensor([0, 7, -1, 13, 23])  # -1: a padding row, not written
    fused.write_kv(k, v, pool[:, 1, 0], pool[:, 1, 1], slots)
    fused.write_kv_ref(k, v, expected[:, 1, 0], expected[:, 1, 1], slots)
    assert torch.equal(pool.isnan(), expected.isnan())
    assert torch.equal(pool.nan_to_num(), expected.nan_to_num())
    with pytest.raises(RuntimeError, match="past the cache"):
        fused.write_kv(k, v, pool[:, 1, 0], pool[:, 1, 1], torch.tensor([0, 1, 2, 3, 24]))
