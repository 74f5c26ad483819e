"""``--performance-mode``: one choice sets batch limits, token budget, speculation and
quantization; explicit settings win; the same on ``LLM()``, the engine servers and ``splitserve
serve``; the documented table is the code's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from splitserve import LLM
from splitserve.engine.model.quant import Int8Linear, QuantLinear, W8A8Linear
from splitserve.engine.performance_mode import (
    PERFORMANCE_MODES,
    markdown_table,
    mode_settings,
    resolve,
)
from splitserve.engine.spec_decode import SpeculativeConfig
from splitserve.services.common.engine_args import add_engine_arguments, engine_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def test_modes_set_defaults_and_explicit_settings_win():
    inter = resolve("interactivity")
    assert (inter.max_num_seqs, inter.max_num_batched_tokens) == (16, 512)
    assert inter.speculative is not None and inter.speculative.method == "ngram"
    assert inter.quantization == "int8"
    thr = resolve("throughput")
    assert (thr.max_num_seqs, thr.max_num_batched_tokens, thr.speculative) == (256, 4096, None)
    bal = resolve("balanced")
    assert bal.speculative is not None and bal.speculative.disable_by_batch_size == 4
    assert resolve(None) == resolve(None, max_num_seqs=128, max_num_batched_tokens=2048)
    assert resolve(None).speculative is None
    # explicit over the mode's, each on its own
    mixed = resolve("interactivity", max_num_seqs=3, speculative="none", quantization=None)
    assert (mixed.max_num_seqs, mixed.max_num_batched_tokens) == (3, 512)
    assert mixed.speculative is None and mixed.quantization is None
    own = resolve("throughput", speculative={"num_speculative_tokens": 2})
    assert own.speculative == SpeculativeConfig(num_speculative_tokens=2)
    with pytest.raises(ValueError, match="interactivity, balanced, throughput"):
        mode_settings("fast")


def test_the_modes_quantization_and_explicit_schemes():
    assert [resolve(m).quantization for m in PERFORMANCE_MODES] == ["int8", None, None]
    assert resolve(None).quantization is None
    # explicit wins both ways: another scheme, or "none" (the flag's spelling) / None
    assert resolve("interactivity", quantization="w8a8").quantization == "w8a8"
    assert resolve("interactivity", quantization="none").quantization is None
    assert resolve("throughput", quantization="int8").quantization == "int8"
    assert resolve(None, quantization="none").quantization is None
    # the kernels are CPU kernels: on a GPU the mode sets everything else
    gpu = resolve("interactivity", device="cuda")
    assert gpu.quantization is None and gpu.max_num_seqs == 16 and gpu.speculative is not None


def test_a_modes_quantization_falls_back_where_the_kernels_do_not_load(monkeypatch, caplog):
    from splitserve.kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)
    with caplog.at_level("WARNING"):
        settings = resolve("interactivity")
    assert settings.quantization is None and settings.speculative is not None
    assert "C++ CPU kernels" in caplog.text
    # an explicit scheme is not second-guessed: the engine refuses it, naming why
    assert resolve("interactivity", quantization="int8").quantization == "int8"


def test_the_documented_table_is_the_codes():
    assert markdown_table() in DOCS.read_text()


def test_llm_takes_a_mode_and_explicit_arguments(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32,
              performance_mode="interactivity", max_num_batched_tokens=64)  # fmt: skip
    cfg = llm.engine.config
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == (16, 64)
    assert cfg.speculative == mode_settings("interactivity").speculative
    assert cfg.performance_mode == "interactivity"
    assert llm.engine.speculator is not None
    # the mode's quantization is applied: the projections hold int8 weights
    assert cfg.quantization == "int8"
    assert isinstance(llm.engine.model.layers[0].mlp.down_proj, Int8Linear)
    off = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32,
              performance_mode="interactivity", speculative_config={},
              quantization="none")  # fmt: skip
    assert off.engine.speculator is None
    assert off.engine.config.quantization is None
    assert not any(isinstance(m, QuantLinear) for m in off.engine.model.modules())
    other = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32,
                performance_mode="interactivity", quantization="w8a8")  # fmt: skip
    assert isinstance(other.engine.model.layers[0].mlp.down_proj, W8A8Linear)
    with pytest.raises(ValueError, match="performance_mode"):
        LLM(model=str(tiny_llama_dir), performance_mode="fast")


def _server_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(list(argv))


def test_engine_server_flags():
    cfg = engine_config(_server_args("--performance-mode", "throughput", "--max-num-seqs", "7"))
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens) == (7, 4096)
    assert cfg.speculative is None and cfg.performance_mode == "throughput"
    assert cfg.quantization is None
    cfg = engine_config(_server_args("--performance-mode", "interactivity"))
    assert cfg.quantization == "int8" and cfg.scheduler.max_num_seqs == 16
    cfg = engine_config(
        _server_args("--performance-mode", "interactivity", "--quantization", "none")
    )
    assert cfg.quantization is None and cfg.speculative is not None
    cfg = engine_config(_server_args("--performance-mode", "throughput", "--quantization", "w8a8"))
    assert cfg.quantization == "w8a8"
    cfg = engine_config(_server_args("--performance-mode", "interactivity", "--device", "cuda"))
    assert cfg.quantization is None  # the mode's scheme is a CPU one
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    cfg = engine_config(_server_args("--speculative-config", spec))
    assert cfg.speculative == SpeculativeConfig(4, "ngram", prompt_lookup_max=4)
    assert cfg.scheduler.max_num_seqs == 128  # no mode: the engine's defaults
    cfg = engine_config(
        _server_args("--performance-mode", "interactivity", "--speculative-config", "none")
    )
    assert cfg.speculative is None and cfg.scheduler.max_num_seqs == 16
    for bad in ('{"num_speculative_tokens": 0}', "{nope", '{"num_speculative_tokens": 2, "x": 1}'):
        with pytest.raises(SystemExit):  # a usage error naming the field, before any model loads
            _server_args("--speculative-config", bad)
    with pytest.raises(SystemExit):
        _server_args("--performance-mode", "fast")


def test_serve_passes_the_choice_to_every_engine():
    from splitserve.serve import add_arguments, plan

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    spec = '{"num_speculative_tokens": 3, "prompt_lookup_max": 3}'
    args = parser.parse_args(
        ["--performance-mode", "balanced", "--speculative-config", spec, "--quantization", "none"]
    )
    engines, _ = plan(args)
    assert {c.name for c in engines} == {"prefill-0", "decode-0"}
    for child in engines:
        argv = child.argv
        assert argv[argv.index("--performance-mode") + 1] == "balanced"
        passed = json.loads(argv[argv.index("--speculative-config") + 1])
        assert SpeculativeConfig.from_dict(passed) == SpeculativeConfig.from_dict(spec)
        assert argv[argv.index("--quantization") + 1] == "none"
    assert set(PERFORMANCE_MODES) == {"interactivity", "balanced", "throughput"}
