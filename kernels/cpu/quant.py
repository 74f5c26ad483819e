"""Quantized-weight linear layers: packers, the C++ ops' wrappers and their torch twins.

Three weight formats (docs/quantization.md), each with a packer that turns weights into the
layout its op reads, the op's wrapper (``*_linear``: checks, then ``torch.ops.splitserve_cpu``)
and a torch reference (``*_linear_ref``) that computes the same numbers the slow, obvious way;
the tests hold every instruction-set path of each op to its reference.

- ``Int8Weights``: int8, one fp32 scale per output row (``pack_int8``). ``int8_linear`` keeps x
  in its float dtype (weight-only); ``w8a8_linear`` quantizes each row of x to int8 (dynamic,
  symmetric, one scale per token) and sums in integers.
- ``BlockWeights``: GGUF's 32-column blocks (``pack_gguf`` takes Q8_0, Q4_0 and Q4_1 bytes as
  the file stores them). The quantized bytes are the file's own; only the fp16 scales (and Q4_1's
  mins) move into arrays of their own, and Q4_0 becomes Q4_1 with m = -8 d (exact in fp16).
  ``block_linear`` quantizes x per 32-column block to int8, as llama.cpp does.

Packed rows have a multiple of 64 columns (zero padding; a padded block has d = m = 0), so the
kernels never handle a ragged tail; x keeps its own width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitserve.kernels import cpu

ALIGN = 64  # packed columns per row: a multiple of this
BLOCK = 32  # GGUF block
# GGML type ids (ggml.h) of the block formats ``pack_gguf`` takes.
GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 2, 3, 8
_BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34}


def ops():
    """``torch.ops.splitserve_cpu`` (raises where the C++ kernels could not be built)."""
    ops = cpu.load()
    if ops is None:
        raise RuntimeError("splitserve C++ CPU kernels are not available (see the log)")
    return ops


def impls() -> list[int]:
    """Instruction sets the quantized ops can use here: 0 scalar, 1 AVX2, 2 AVX-512,
    3 AVX-512 VNNI (each CPU runs every level up to its best)."""
    ops = cpu.load()
    return list(ops.quant_impls()) if ops is not None else []


def padded(k: int) -> int:
    return -(-k // ALIGN) * ALIGN


# ---------------------------------------------------------------- int8, one scale per row


@dataclass(frozen=True)
class Int8Weights:
    """``weight`` int8 [N, Kp], ``scale`` fp32 [N], ``wsum`` int32 [N] (row sums of ``weight``,
    which the VNNI path of ``w8a8_linear`` needs), ``in_features`` K <= Kp."""

    weight: torch.Tensor
    scale: torch.Tensor
    wsum: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        return self.weight[:, : self.in_features].float() * self.scale[:, None]


def pack_int8(weight: torch.Tensor) -> Int8Weights:
    """Symmetric per-row int8: scale = max|w| / 127, q = round(w / scale) (all-zero rows: 0)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    packed = torch.zeros(n, padded(k), dtype=torch.int8)
    packed[:, :k] = q
    wsum = q.sum(dim=1, dtype=torch.int32)
    return Int8Weights(packed, scale.contiguous(), wsum, k)


def _check_x(x: torch.Tensor, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [M, {in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError("quantized linear layers run on the CPU")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def int8_linear(x: torch.Tensor, w: Int8Weights, impl: int = -1) -> torch.Tensor:
    """``x @ dequantize(w).T`` in x's dtype, weights read as int8. x: [M, K]."""
    _check_x(x, w.in_features)
    return ops().int8_linear(_rows(x), w.weight, w.scale, impl)


def int8_linear_ref(x: torch.Tensor, w: Int8Weights) -> torch.Tensor:
    return (x.float() @ w.dequantize().T).to(x.dtype)


def quantize_rows(x: torch.Tensor, group: int, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per ``group`` columns of x zero-padded to ``kp`` columns:
    (q int8 [M, kp], d fp32 [M, kp / group]) with q * d ~ x; d = amax / 127,
    q = round(x * (127 / amax)), half to even, exactly as the kernels compute it."""
    m, k = x.shape
    xf = torch.zeros(m, kp, dtype=torch.float32)
    xf[:, :k] = x.float()
    g = xf.view(m, kp // group, group)
    amax = g.abs().amax(dim=2)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(g * inv[:, :, None]).clamp_(-127, 127).to(torch.int8)
    return q.view(m, kp), amax / 127.0


def w8a8_linear(x: torch.Tensor, w: Int8Weights, impl: int = -1) -> torch.Tensor:
    """``x @ dequantize(w).T`` with x quantized per row to int8 first (integer dot products)."""
    _check_x(x, w.in_features)
    return ops().w8a8_linear(_rows(x), w.weight, w.scale, w.wsum, impl)


def w8a8_linear_ref(x: torch.Tensor, w: Int8Weights) -> torch.Tensor:
    kp = w.weight.shape[1]
    q, d = quantize_rows(x, kp, kp)
    isum = q.to(torch.int64) @ w.weight.to(torch.int64).T  # exact
    return (isum.float() * d[:, :1] * w.scale[None, :]).to(x.dtype)


# ---------------------------------------------------------------- GGUF blocks


@dataclass(frozen=True)
class BlockWeights:
    """``qs`` uint8 [N, Kp * bits / 8] (4-bit: a block's 16 bytes hold columns i and i + 16 in
    the low and high nibble of byte i, GGUF's order; 8-bit: signed bytes), ``d`` fp16
    [N, Kp / 32], ``m`` fp16 [N, Kp / 32] (4-bit) or empty (8-bit: no min)."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    bits: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m))

    def values(self) -> torch.Tensor:
        """The integer weights [N, Kp] (int16: unsigned 4-bit or signed 8-bit)."""
        if self.bits == 8:
            return self.qs.view(torch.int8).to(torch.int16)
        n = self.qs.shape[0]
        blocks = self.qs.view(n, -1, 16).to(torch.int16)
        return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).view(n, -1)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K]."""
        n = self.qs.shape[0]
        v = self.values().float().view(n, -1, BLOCK) * self.d.float()[:, :, None]
        if self.m.numel():
            v = v + self.m.float()[:, :, None]
        return v.view(n, -1)[:, : self.in_features]

    def rows(self, index: torch.Tensor) -> BlockWeights:
        """The same format restricted to some rows (e.g. a permutation of them)."""
        return BlockWeights(
            self.qs[index].contiguous(),
            self.d[index].contiguous(),
            self.m[index].contiguous() if self.m.numel() else self.m,
            self.bits,
            self.in_features,
        )


def pack_gguf(raw: np.ndarray | torch.Tensor, ggml_type: int, in_features: int) -> BlockWeights:
    """GGUF tensor bytes ([N, bytes per row], as ``gguf.GGUFReader`` gives them) -> BlockWeights.
    Q8_0 blocks: fp16 d + 32 int8. Q4_0: fp16 d + 16 bytes (value (u - 8) d). Q4_1: fp16 d,
    fp16 m + 16 bytes (value u d + m)."""
    if ggml_type not in _BLOCK_BYTES:
        raise ValueError(f"GGML type {ggml_type} is not Q4_0, Q4_1 or Q8_0")
    data = torch.from_numpy(np.array(raw, copy=True)).view(torch.uint8)  # own, writable bytes
    if in_features % BLOCK:
        raise ValueError(f"in_features {in_features} is not a multiple of {BLOCK}")
    n, nb = data.shape[0], in_features // BLOCK
    size = _BLOCK_BYTES[ggml_type]
    if data.dim() != 2 or data.shape[1] != nb * size:
        raise ValueError(f"expected [{n}, {nb * size}] bytes, got {tuple(data.shape)}")
    blocks = data.view(n, nb, size)
    d = blocks[:, :, 0:2].contiguous().view(torch.float16).view(n, nb)
    if ggml_type == GGML_Q8_0:
        qs, m, bits = blocks[:, :, 2:].reshape(n, nb * BLOCK), None, 8
    elif ggml_type == GGML_Q4_1:
        m = blocks[:, :, 2:4].contiguous().view(torch.float16).view(n, nb)
        qs, bits = blocks[:, :, 4:].reshape(n, nb * 16), 4
    else:
        m, qs, bits = d * -8, blocks[:, :, 2:].reshape(n, nb * 16), 4
    nbp = padded(in_features) // BLOCK
    bytes_per_block = BLOCK * bits // 8
    qs_p = torch.zeros(n, nbp * bytes_per_block, dtype=torch.uint8)
    qs_p[:, : qs.shape[1]] = qs
    d_p = torch.zeros(n, nbp, dtype=torch.float16)
    d_p[:, :nb] = d
    m_p = torch.zeros(0, dtype=torch.float16)
    if m is not None:
        m_p = torch.zeros(n, nbp, dtype=torch.float16)
        m_p[:, :nb] = m
    return BlockWeights(qs_p, d_p, m_p, bits, in_features)


def block_linear(x: torch.Tensor, w: BlockWeights, impl: int = -1) -> torch.Tensor:
    """``x @ dequantize(w).T`` with x quantized per 32-column block (integer dots per block)."""
    _check_x(x, w.in_features)
    return ops().block_linear(_rows(x), w.qs, w.d, w.m, w.bits, impl)


def block_linear_ref(x: torch.Tensor, w: BlockWeights) -> torch.Tensor:
    n = w.out_features
    q, dx = quantize_rows(x, BLOCK, w.d.shape[1] * BLOCK)  # [M, Kp], [M, nb]
    m_rows, kp = q.shape
    qb = q.view(m_rows, -1, BLOCK).to(torch.int64)
    vb = w.values().view(n, -1, BLOCK).to(torch.int64)
    dots = torch.einsum("mbk,nbk->mnb", qb, vb).float()  # exact integer sums per block
    y = (dots * dx[:, None, :] * w.d.float()[None, :, :]).sum(-1)
    if w.m.numel():
        sums = qb.sum(-1).float() * dx  # [M, nb]
        y = y + sums @ w.m.float().T
    return y.to(x.dtype)
