"""bench/kernels.py: skips cleanly without CUDA, and its smoke mode runs every kernel end to end
(including its own triton-vs-torch agreement checks) through the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-P", str(BENCH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_skips_without_cuda():
    proc = _bench()
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_kernel(tmp_path):
    report = tmp_path / "bench.json"
    proc = _bench("--smoke", "--dtype", "float32", "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads(report.read_text())["results"]
    kernels = {(r["kernel"], r["shape"]) for r in results}
    assert {k for k, _ in kernels} == {"reshape_and_cache", "paged_decode", "paged_prefill"}
    assert len(kernels) == 6
    assert all(r["triton_us"] > 0 and r["torch_us"] > 0 for r in results)
