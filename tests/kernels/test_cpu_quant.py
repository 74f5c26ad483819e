"""The quantized-weight linear ops (every instruction-set path this CPU runs) against their
torch references, and the GGUF packer against gguf-py's own dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.kernels import cpu
from splitserve.kernels.cpu import quant

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ CPU kernels could not be built")

NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512vnni"}
# (M, N, K): one row; ragged N (tile tails) and K (padding); M past the int8 large-M switch
# (16) and past one 64-row slab; the shapes of SmolLM2's projections.
SHAPES = [(1, 37, 576), (3, 9, 96), (5, 13, 1536), (17, 6, 64), (70, 11, 160), (2, 960, 576)]


def _impls():
    return [pytest.param(i, id=NAMES[i]) for i in NAMES]


def _need(impl: int) -> None:
    if impl not in quant.impls():
        pytest.skip(f"{NAMES[impl]} is not supported by this CPU")


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    scale = ref.float().abs().max().item()
    # float32: sums in another order; bf16: one rounding step of the result apart
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_int8_and_w8a8_match_reference(impl, dtype, m, n, k) -> None:
    _need(impl)
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = quant.pack_int8(torch.randn(n, k, generator=gen))
    # A column stride other than the row length: a slice of a wider tensor, as the model has.
    x = torch.randn(m, k + 8, generator=gen)[:, 3 : 3 + k].to(dtype)
    _close(quant.int8_linear(x, w, impl), quant.int8_linear_ref(x, w), dtype)
    out, ref = quant.w8a8_linear(x, w, impl), quant.w8a8_linear_ref(x, w)
    _close(out, ref, dtype)
    if dtype == torch.float32:  # integer sums: the same bits on every path
        assert torch.equal(out, quant.w8a8_linear(x, w, 0))


def test_int8_packing_round_trips_and_handles_zero_rows() -> None:
    weight = torch.randn(5, 70)
    weight[2] = 0
    w = quant.pack_int8(weight)
    assert w.weight.shape == (5, 128) and w.weight.dtype == torch.int8
    assert not w.weight[:, 70:].any()  # padding is zero
    assert w.weight.abs().max() == 127
    assert torch.equal(w.wsum, w.weight.sum(1, dtype=torch.int32))
    assert (w.dequantize() - weight).abs().max() <= w.scale.max() / 2 + 1e-6
    assert not w.dequantize()[2].any()


GGML = {"Q8_0": quant.GGML_Q8_0, "Q4_0": quant.GGML_Q4_0, "Q4_1": quant.GGML_Q4_1}


def _gguf_weights(kind: str, n: int, k: int, seed: int):
    gguf = pytest.importorskip("gguf")
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    dense = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(dense, qtype)
    return raw, gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("kind", list(GGML))
def test_gguf_packing_keeps_the_files_values_exactly(kind) -> None:
    raw, expected = _gguf_weights(kind, 7, 96, seed=1)
    w = quant.pack_gguf(raw, GGML[kind], 96)
    assert w.bits == (8 if kind == "Q8_0" else 4)
    assert w.qs.shape == (7, 128 * w.bits // 8)  # 96 columns padded to 128 (a zero block)
    assert torch.equal(w.dequantize(), torch.from_numpy(expected))
    assert not w.d[:, 3:].any()
    # 4-bit bytes are the file's own; only scales (and mins) are split off
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    file_qs = torch.from_numpy(raw.reshape(7, 3, size)[:, :, size - 32 * w.bits // 8 :].copy())
    assert torch.equal(w.qs[:, : 3 * 32 * w.bits // 8], file_qs.reshape(7, -1))


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("kind", list(GGML))
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_block_linear_matches_reference(impl, kind, m, n, k) -> None:
    _need(impl)
    raw, dense = _gguf_weights(kind, n, k, seed=m + n)
    w = quant.pack_gguf(raw, GGML[kind], k)
    gen = torch.Generator().manual_seed(k)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = quant.block_linear_ref(x, w)
        _close(quant.block_linear(x, w, impl), ref, dtype)
    # ... and the reference is the dense product up to the activations' int8 rounding
    x = torch.randn(m, k, generator=gen)
    exact = x @ torch.from_numpy(dense).T
    err = (quant.block_linear_ref(x, w) - exact).abs().max() / exact.abs().max()
    assert err < 0.03


def test_bad_inputs_are_refused_with_the_argument_named() -> None:
    w = quant.pack_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        quant.int8_linear(torch.randn(2, 63), w)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        quant.w8a8_linear(torch.randn(2, 64).double(), w)
    with pytest.raises(RuntimeError, match="impl 9 is not available"):
        quant.int8_linear(torch.randn(2, 64), w, impl=9)
    with pytest.raises(ValueError, match="GGML type 12"):
        quant.pack_gguf(np.zeros((2, 144), np.uint8), 12, 256)
    with pytest.raises(RuntimeError, match="4-bit blocks need their mins"):
        b = quant.pack_gguf(np.zeros((2, 36), np.uint8), quant.GGML_Q4_0, 64)
        cpu.load().block_linear(torch.randn(1, 64), b.qs, b.d, b.d[:0], 4, -1)
