"""The dense small-row linear op (``kernels/cpu/dense_linear.cpp``) on every path this CPU runs,
against a float64 matmul, and the model's ``Linear`` routing row counts to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.engine.model import llama
from splitserve.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ CPU kernels could not be built")

NAMES = {0: "scalar", 1: "avx512"}
# (M, N, K): one row; ragged N (tile tails: N % 4) and K (masked tail: K % 16); M across tiles
# of 4 rows; a decode-sized SmolLM2 projection.
SHAPES = [(1, 37, 576), (3, 9, 97), (5, 13, 1536), (17, 6, 64), (4, 3, 7), (8, 960, 576)]


def _impls():
    return [pytest.param(i, id=NAMES[i]) for i in NAMES]


def _reference(x, w, b):
    out = x.double() @ w.double().t()
    return out if b is None else out + b.double()


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dense_linear_matches_float64(impl, wdtype, xdtype, m, n, k, bias) -> None:
    if impl not in cpu.dense_impls():
        pytest.skip(f"{NAMES[impl]} is not supported by this CPU")
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    # Weight rows and x rows strided (slices of wider tensors), as the model's views are.
    w = torch.randn(n, k + 5, generator=gen)[:, 2 : 2 + k].to(wdtype)
    x = torch.randn(m, k + 8, generator=gen)[:, 3 : 3 + k].to(xdtype)
    b = torch.randn(n, generator=gen).to(wdtype) if bias else None
    out = cpu.dense_linear(x, w, b, impl)
    assert out.dtype == xdtype and out.shape == (m, n)
    ref = _reference(x, w, b)
    # fp32 sums of exact products: float32 rounding of a K-term sum; a bf16 result: one rounding.
    scale = ref.abs().max().item()
    tol = 1e-5 if xdtype == torch.float32 else 8e-3
    assert (out.double() - ref).abs().max().item() <= tol * scale
    # A row's result does not depend on the other rows of the batch (tile position).
    alone = cpu.dense_linear(x[m - 1 :].contiguous(), w, b, impl)
    assert torch.equal(alone, out[m - 1 :])


def test_dense_linear_rejects_bad_inputs() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="columns"):
        cpu.dense_linear(x, torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu.dense_linear(x.half(), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        cpu.dense_linear(x, torch.randn(8, 3).t())
    with pytest.raises(RuntimeError, match="bias"):
        cpu.dense_linear(x, torch.randn(3, 8), torch.randn(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_linear_sends_decode_rows_to_the_kernel(dtype, monkeypatch) -> None:
    """``use_cpu_kernels`` sets each layer's row limit by weight dtype and CPU; rows up to it go
    to the dense op, more rows to torch (bf16 without native bf16: a float32 matmul)."""
    arch = llama.LlamaArch(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=64,
        qkv_bias=True, tie_word_embeddings=True, model_type="llama",
    )  # fmt: skip
    cfg = type("Cfg", (), {"rope_theta": 10000.0})()
    model = llama.LlamaForCausalLM(arch, cfg).to(dtype)
    model.use_cpu_kernels()
    linear = model.layers[0].self_attn.qkv_proj
    emulated = dtype == torch.bfloat16 and not llama.native_bf16()
    expect_rows = llama.DENSE_ROWS[dtype] if dtype == torch.float32 or emulated else 0
    assert linear.dense_rows == expect_rows and linear.upcast == emulated
    assert model.lm_head.dense_rows == expect_rows  # the tied LM head too

    calls = []
    real = cpu.dense_linear
    monkeypatch.setattr(cpu, "dense_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, expect_rows, expect_rows + 1):
        if rows == 0:
            continue
        x = torch.randn(rows, 32).to(dtype)
        out = linear(x)
        ref = _reference(x, linear.weight, linear.bias)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert calls == [r for r in (1, expect_rows) if 0 < r <= expect_rows]

    model.use_cpu_kernels(False)
    assert linear.dense_rows == 0 and not linear.upcast
    x = torch.randn(3, 32).to(dtype)
    assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
