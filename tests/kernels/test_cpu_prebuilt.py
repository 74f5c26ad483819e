"""The C++ CPU kernels load from a prebuilt library (the image's way) without compiling.

The image builds them once (`scripts/image-install.sh`, `kernels.cpu.prebuild`) and sets
SPLITSERVE_CPU_KERNELS_JIT=0, so a pod loads `<dir>/splitserve_cpu-<digest>/splitserve_cpu.so`
or falls back to torch, and never compiles. Checked in fresh processes (``load`` is cached) with
a copy of this checkout's own build as the prebuilt library, so nothing is compiled here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.kernels import cpu

PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from splitserve.kernels import cpu
print("available", cpu.available())
"""


def _probe(env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-P", "-c", PROBE],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_prebuilt_library_loads_without_a_compiler(tmp_path: Path) -> None:
    built = cpu.build_directory() / "splitserve_cpu.so"
    if not built.exists():
        pytest.skip(f"no local build at {built} (make install builds it)")
    prebuilt = tmp_path / f"splitserve_cpu-{cpu.source_digest()}"
    prebuilt.mkdir()
    shutil.copy2(built, prebuilt / "splitserve_cpu.so")
    env = {cpu.PREBUILT_DIR_ENV: str(tmp_path), cpu.JIT_ENV: "0"}
    out = _probe(env | {"SPLITSERVE_CACHE": str(tmp_path / "empty-cache")})
    assert "C++ CPU kernels: prebuilt" in out and "available True" in out, out
    assert not (tmp_path / "empty-cache").exists()  # nothing compiled


def test_no_prebuilt_and_no_jit_falls_back_to_torch(tmp_path: Path) -> None:
    env = {cpu.PREBUILT_DIR_ENV: str(tmp_path), cpu.JIT_ENV: "0"}
    out = _probe(env | {"SPLITSERVE_CACHE": str(tmp_path / "empty-cache")})
    assert "available False" in out and "forbids compiling" in out, out
