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


def test_a_dead_builders_lock_does_not_stop_the_next_build(tmp_path: Path, monkeypatch) -> None:
    # torch's FileBaton `lock` outlives a builder killed mid-compile; before the flock, every
    # later engine waited on it forever (never ready, empty log)
    built: list[Path] = []

    def fake_compile(directory: Path) -> Path:
        assert not (directory / "lock").exists(), "the stale baton must be gone before building"
        built.append(directory)
        return directory / "splitserve_cpu.so"

    monkeypatch.setattr(cpu, "_compile", fake_compile)
    directory = tmp_path / "splitserve_cpu-x"
    directory.mkdir()
    (directory / "lock").touch()  # what a SIGKILLed build leaves
    cpu._build_once(directory)
    assert built == [directory]

    # a live builder holds the flock: the next one waits for it (here: until the holder exits)
    released = directory / "released"  # the holder writes it just before it lets go
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(1); open(sys.argv[2], 'w').close()",
         str(directory / "build.flock"), str(released)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    cpu._build_once(directory)
    assert released.exists(), "built while another process held the build lock"
    assert built == [directory, directory]
    holder.wait(10)
