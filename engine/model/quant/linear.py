"""Linear layers whose weights stay quantized: drop-in for ``nn.Linear`` (``y = module(x)``).

Each holds its packed weights as buffers (they move with the module, and ``state_dict`` names
them) and calls one C++ op of ``splitserve.kernels.cpu.quant``: ``Int8Linear`` (int8 weights, x
in the model dtype), ``W8A8Linear`` (x quantized per token to int8 as well) and
``BlockLinear`` (a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks, x quantized per 32-column block).
``in_features`` / ``out_features`` are those of the ``nn.Linear`` they replace, so code that
adds a delta after a projection (LoRA) composes with them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels.cpu import quant


class QuantLinear(nn.Module):
    """Common shape of the quantized linears: ``[..., in_features] -> [..., out_features]``."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with, fp32 [out_features, in_features]."""
        raise NotImplementedError

    @property
    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op itself checks shapes and dtypes (a clear error naming the argument); the
        # Python wrappers' checks would cost ~10 us a call, x 121 calls a decode step.
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._matmul(flat)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output row; x stays in its dtype (weight-only)."""

    scheme = "int8"

    def __init__(self, packed: quant.Int8Weights, bias: torch.Tensor | None = None) -> None:
        super().__init__(packed.in_features, packed.out_features, bias)
        self.register_buffer("qweight", packed.weight)
        self.register_buffer("scale", packed.scale)
        self.register_buffer("wsum", packed.wsum)
        ops = quant.ops()
        self._op = (ops.w8a8_linear if self.scheme == "w8a8" else ops.int8_linear).default

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(quant.pack_int8(linear.weight), linear.bias)

    @property
    def packed(self) -> quant.Int8Weights:
        return quant.Int8Weights(self.qweight, self.scale, self.wsum, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.qweight, self.scale, -1)


class W8A8Linear(Int8Linear):
    """int8 weights and int8 activations (dynamic, one scale per token): integer dot products."""

    scheme = "w8a8"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.qweight, self.scale, self.wsum, -1)


class BlockLinear(QuantLinear):
    """A GGUF tensor's blocks as the file stores them (``quant.BlockWeights``)."""

    scheme = "gguf"

    def __init__(self, packed: quant.BlockWeights, bias: torch.Tensor | None = None) -> None:
        super().__init__(packed.in_features, packed.out_features, bias)
        self.bits = packed.bits
        self.register_buffer("qs", packed.qs)
        self.register_buffer("d", packed.d)
        self.register_buffer("m", packed.m)
        self._op = quant.ops().block_linear.default

    @property
    def packed(self) -> quant.BlockWeights:
        return quant.BlockWeights(self.qs, self.d, self.m, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.qs, self.d, self.m, self.bits, -1)


class QuantEmbedding(nn.Module):
    """Token embeddings read from a quantized LM head's rows (tied embeddings keep one copy):
    each step dequantizes only the rows of its tokens."""

    def __init__(self, head: Int8Linear | BlockLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = [head]  # a list: not a submodule (the model owns it as lm_head)
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        if isinstance(head, Int8Linear):
            rows = head.qweight[input_ids, : head.in_features].float()
            return (rows * head.scale[input_ids, None]).to(self.dtype)
        return head.packed.rows(input_ids).dequantize().to(self.dtype)
