"""``--performance-mode``: one choice sets batch limits, token budget and speculation; explicit
settings win; the same on ``LLM()``, the engine servers and ``splitserve serve``; the documented
table is the code's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from splitserve import LLM
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
    off = LLM(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=32,
              performance_mode="interactivity", speculative_config={})  # fmt: skip
    assert off.engine.speculator is None
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
    args = parser.parse_args(["--performance-mode", "balanced", "--speculative-config", spec])
    engines, _ = plan(args)
    assert {c.name for c in engines} == {"prefill-0", "decode-0"}
    for child in engines:
        argv = child.argv
        assert argv[argv.index("--performance-mode") + 1] == "balanced"
        passed = json.loads(argv[argv.index("--speculative-config") + 1])
        assert SpeculativeConfig.from_dict(passed) == SpeculativeConfig.from_dict(spec)
    assert set(PERFORMANCE_MODES) == {"interactivity", "balanced", "throughput"}
