"""dtype "auto" follows what the CPU computes fast (the machines change under us)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine import cpu_features
from splitserve.engine.config import parse_dtype


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD EPYC Zen 4
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Intel Xeon with AMX
        ({"avx2", "fma", "f16c"}, torch.float32),  # AVX2 only: bf16 would be emulated
    ],
)
def test_auto_dtype_follows_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    assert parse_dtype("auto", "cpu") == expected
    assert parse_dtype("bfloat16", "cpu") == torch.bfloat16  # asked for: always honoured
    assert parse_dtype("auto", "cuda") == torch.bfloat16


def test_this_machine_reports_its_flags():
    flags = cpu_features.cpu_flags()
    assert flags, "no CPU flags read from /proc/cpuinfo"
    assert cpu_features.native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
