"""The kernels compile for a real GPU (sm_90) from the wrappers' own launch plans, no GPU needed.

The interpreter accepts code the GPU compiler rejects, so this closes the gap it leaves. It runs
in a child process without TRITON_INTERPRET: once the interpreter has run a kernel in a process,
Triton's compiler no longer works there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _aot(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitserve.kernels.aot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.splitlines()


def _expect(lines: list[str], dtype: str) -> None:
    labels = [
        f"decode[{dtype},partition=32] _decode_partition_kernel",
        f"decode[{dtype},partition=32] _decode_reduce_kernel",
        f"decode[{dtype},partition=512] _decode_partition_kernel",
        f"prefill[{dtype},gqa=1]",
        f"prefill[{dtype},gqa=3]",
        f"prefill[{dtype},gqa=8]",
        f"reshape_and_cache[{dtype}]",
    ]
    for label in labels:
        (line,) = [line for line in lines if f"sm_90 {label}:" in line]
        size = int(line.split("cubin ")[1].split()[0])
        assert size > 1000, line
        # Tile sizes and warp counts were chosen so that nothing spills to local memory.
        assert "spill 0/0 bytes" in line, line


def test_bf16_kernels_compile_for_sm90():
    _expect(_aot("--arch", "90", "--only", "bfloat16"), "bfloat16")


@pytest.mark.slow
def test_fp32_kernels_compile_for_sm90():
    _expect(_aot("--arch", "90", "--only", "float32"), "float32")
