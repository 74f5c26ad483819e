"""Quantized weights kept quantized at run time (docs/quantization.md).

``apply_quantization`` turns a loaded model into its quantized form in place, by the engine
config's ``quantization``:

- ``"int8"`` / ``"w8a8"``: every projection and the LM head become ``Int8Linear`` /
  ``W8A8Linear`` (int8 weights, one scale per output row, quantized from the loaded weights);
  a tied embedding reads its rows from the quantized LM head (one copy).
- ``"gguf"``: the projections come from the GGUF file itself (``gguf.load_gguf``): the default
  model's own Q4_1 / Q8_0 blocks, never dequantized.

Norms, rotary tables and the KV cache stay in the model dtype. The C++ kernels must load (they
are the only implementation of the quantized matmuls); where they cannot, this raises.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from splitserve.engine.model.quant.linear import (
    BlockLinear,
    Int8Linear,
    QuantEmbedding,
    QuantLinear,
    W8A8Linear,
)

log = logging.getLogger(__name__)

__all__ = [
    "BlockLinear",
    "Int8Linear",
    "QuantEmbedding",
    "QuantLinear",
    "W8A8Linear",
    "apply_quantization",
    "gguf_source",
]


def gguf_source(model: str | None) -> Path:
    """The GGUF file ``--quantization gguf`` reads for the configured model argument."""
    from splitserve.engine.model.loader import (
        DEFAULT_MODEL_HUB_ID,
        DEFAULT_MODEL_NAME,
        default_gguf_path,
    )

    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_HUB_ID):
        return default_gguf_path()
    path = Path(str(model).removeprefix("file://")).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ValueError(
        f"quantization 'gguf' needs a .gguf model file (or the default model); {model!r} is not "
        "one: use quantization 'int8' or 'w8a8' to quantize other weights"
    )


def _require_kernels() -> None:
    from splitserve.kernels import cpu

    if not cpu.available():
        raise RuntimeError(
            "quantized weights need the C++ CPU kernels, which could not be built or loaded "
            "here (see the log); run without --quantization"
        )


def apply_quantization(model: nn.Module, scheme: str, model_arg: str | None) -> None:
    """Quantize ``model`` (loaded, on the CPU) in place by ``scheme``; see the module doc."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantized weights run on the CPU only (device must be 'cpu')")
    _require_kernels()
    dtype = model.norm.weight.dtype
    if scheme == "gguf":
        from splitserve.engine.model.loader import cache_root
        from splitserve.engine.model.quant.gguf import cached_gguf, install

        path = gguf_source(model_arg)
        arch = model.arch
        weights = cached_gguf(path, arch.num_heads, arch.num_kv_heads, cache_root())
        kinds = install(model, weights, dtype)
        log.info("GGUF weights from %s kept quantized: %s", path.name, _count(kinds.values()))
        return
    cls = {"int8": Int8Linear, "w8a8": W8A8Linear}[scheme]
    tied = model.arch.tie_word_embeddings
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, cls.from_linear(module))
    if tied:
        model.embed_tokens = QuantEmbedding(model.lm_head, dtype)
    log.info("weights quantized to %s", scheme)


def _count(values) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
