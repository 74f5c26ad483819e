"""``--performance-mode``: one declarative choice of batch limits, token budget, speculation and
quantization defaults. Whatever is set explicitly (a flag, an ``LLM()`` argument) wins.

The modes (``markdown_table()`` renders them; docs/performance.md holds the same table, a test
keeps the two equal):

- interactivity: 16 sequences, 512 tokens per step, n-gram speculation (4 drafts), int8
  weight-only weights (on the CPU);
- balanced: 128 sequences, 2048 tokens per step, n-gram speculation (2 drafts) only while at most
  4 requests run, weights in the model dtype;
- throughput: 256 sequences, 4096 tokens per step, no speculation, weights in the model dtype;
- no mode: 128 sequences, 2048 tokens per step, no speculation (the engine's own defaults).

Why, on CPUs: a batch of one is bound by weight bytes and per-step overhead, so spending
compute on verifying drafts (up to 5 tokens per forward pass for nearly the price of one) and on
fewer weight bytes (int8) buys latency; a small token budget cuts long prompts into chunks so
running streams never wait long for their next token. Large batches are bound by arithmetic:
there every draft is a token of work that may be thrown away, so throughput mode does not
speculate, and a larger budget and batch keep the matmuls large. int8 weight-only is 2-4x faster
than float32 per projection below 16 rows and no faster from 16 rows (measured,
docs/benchmarks.md), so only interactivity takes it; w8a8 is faster at every batch size on VNNI
CPUs but changes answers more (91% first-token agreement), so no mode picks it implicitly.
Balanced speculates only while few requests run (``disable_by_batch_size``): interactivity for a
few users, throughput under load. Quantization runs on the CPU only, so a mode's quantization
applies only where the engine's device is the CPU. Torch-free: ``splitserve serve`` and the
operator check their settings with it before starting anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from splitserve.engine.spec_decode.config import SpeculativeConfig

log = logging.getLogger(__name__)

PERFORMANCE_MODES = ("interactivity", "balanced", "throughput")


@dataclass(frozen=True)
class ModeSettings:
    """What a mode sets; each field is a default that an explicit setting overrides."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    speculative: SpeculativeConfig | None = None
    # One of protocol.kv_compat.QUANTIZATIONS, applied on CPU engines only; None: model dtype.
    quantization: str | None = None


_MODES = {
    "interactivity": ModeSettings(
        max_num_seqs=16,
        max_num_batched_tokens=512,
        speculative=SpeculativeConfig(
            num_speculative_tokens=4, method="ngram", prompt_lookup_max=4, prompt_lookup_min=2
        ),
        quantization="int8",
    ),
    "balanced": ModeSettings(
        max_num_seqs=128,
        max_num_batched_tokens=2048,
        # 2 drafts: never a loss in docs/benchmarks.md's runs on a float32 CPU, where a step of
        # 3 rows costs ~1.1x one row and 5 rows 2.2x (interactivity takes 4: more when drafts
        # hit, and rows are nearly free on AMX / GPUs)
        speculative=SpeculativeConfig(
            num_speculative_tokens=2,
            method="ngram",
            prompt_lookup_max=4,
            prompt_lookup_min=2,
            disable_by_batch_size=4,
        ),  # fmt: skip
    ),
    "throughput": ModeSettings(max_num_seqs=256, max_num_batched_tokens=4096),
}

# "no speculation", spelled explicitly (``--speculative-config none``) to override a mode's
_OFF = ("", "none", "null", "off", "{}")
# "weights in the model dtype", spelled explicitly (``--quantization none``) over a mode's
QUANTIZATION_OFF = "none"


def mode_settings(mode: str | None) -> ModeSettings:
    """The defaults of ``mode`` (None: the engine's own defaults). ValueError names the choices."""
    if mode is None:
        return ModeSettings()
    if mode not in _MODES:
        raise ValueError(
            f"performance_mode must be one of {', '.join(PERFORMANCE_MODES)}, got {mode!r}"
        )
    return _MODES[mode]


_UNSET = object()


def _quant_kernels_load() -> bool:
    # Imported here: the rest of this module stays torch-free (serve, operator).
    from splitserve.kernels import cpu

    return cpu.available()


@dataclass(frozen=True)
class ResolvedSettings:
    max_num_seqs: int
    max_num_batched_tokens: int
    speculative: SpeculativeConfig | None
    quantization: str | None


def resolve(
    mode: str | None,
    *,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    speculative: SpeculativeConfig | dict | str | None | object = _UNSET,
    quantization: str | None | object = _UNSET,
    device: str = "cpu",
) -> ResolvedSettings:
    """The settings to run with: each explicit argument (not None; for ``speculative`` and
    ``quantization`` anything but the default ``_UNSET``, so None turns them off) over the mode's.

    ``speculative`` may be a ``SpeculativeConfig``, vLLM's dict, its JSON text, or "none";
    ``quantization`` a scheme name, or "none" / None for weights in the model dtype. The mode's
    quantization applies only when ``device`` is the CPU and the C++ CPU kernels load (they are
    the only implementation of the quantized matmuls): elsewhere a mode sets everything else
    and says so in the log. An explicit scheme is passed on as given (the engine refuses it
    where it cannot run, naming why).
    """
    base = mode_settings(mode)
    spec = base.speculative
    if speculative is not _UNSET:
        spec = parse_speculative(speculative)  # type: ignore[arg-type]
    if quantization is _UNSET:
        quant = base.quantization if device == "cpu" else None
        if quant is not None and not _quant_kernels_load():
            log.warning(
                "performance mode %s: weights stay in the model dtype, not %s: the C++ CPU "
                "kernels could not be built or loaded here (see the log above)",
                mode,
                quant,
            )
            quant = None
    else:
        quant = None if quantization in (None, QUANTIZATION_OFF) else quantization
    return ResolvedSettings(
        max_num_seqs=base.max_num_seqs if max_num_seqs is None else max_num_seqs,
        max_num_batched_tokens=(
            base.max_num_batched_tokens
            if max_num_batched_tokens is None
            else max_num_batched_tokens
        ),  # fmt: skip
        speculative=spec,
        quantization=quant,  # type: ignore[arg-type]
    )


def parse_speculative(value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
    """A ``speculative_config`` in any accepted spelling; None / "none" / "{}": off."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return None
    if isinstance(value, dict) and not value:
        return None
    return SpeculativeConfig.from_dict(value)


def speculative_flag(text: str) -> SpeculativeConfig | str:
    """``--speculative-config`` as argparse's ``type``: checked as it is parsed (a bad one is a
    usage error naming the field); "none" stays "none" (off, even over a performance mode's)."""
    import argparse

    try:
        spec = parse_speculative(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return "none" if spec is None else spec


def markdown_table() -> str:
    """The modes as docs/performance.md shows them."""
    rows = [
        "| mode | max_num_seqs | max_num_batched_tokens | speculation | quantization |",
        "|---|---|---|---|---|",
    ]
    for name in (*PERFORMANCE_MODES, None):
        m = mode_settings(name)
        spec = "off"
        if m.speculative is not None:
            c = m.speculative
            spec = (
                f"{c.method}, {c.num_speculative_tokens} drafts, lookup "
                f"{c.prompt_lookup_min}-{c.prompt_lookup_max}"
            )
            if c.disable_by_batch_size is not None:
                spec += f", only while <= {c.disable_by_batch_size} requests run"
        quant = f"{m.quantization} (CPU engines)" if m.quantization else "none (model dtype)"
        rows.append(
            f"| {name or '(none)'} | {m.max_num_seqs} | {m.max_num_batched_tokens} | {spec} "
            f"| {quant} |"
        )
    return "\n".join(rows)
