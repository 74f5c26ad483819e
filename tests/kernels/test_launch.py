"""Where the kernels may run: interpreter selection at launch time, clear refusals otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import splitserve.kernels as kernels
from splitserve.kernels._launch import next_pow2

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter path")


@CPU_ONLY
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.available()
    kv = torch.zeros(2, 1, 2, 16, 1, 64)
    key = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.reshape_and_cache(
            key, key, kv[:, 0, 0], kv[:, 0, 1], torch.zeros(1, dtype=torch.long)
        )


@CPU_ONLY
def test_interpreter_chosen_at_launch_not_at_import():
    # A fresh process decorates the kernels with TRITON_INTERPRET unset (as when an engine test
    # imports them before the kernel tests' conftest runs), then sets it and launches.
    script = textwrap.dedent(
        """
        import os
        import torch
        from splitserve.kernels import available, reshape_and_cache
        import splitserve.kernels.cache_write  # decorates the kernel now
        assert not available()
        os.environ["TRITON_INTERPRET"] = "1"
        assert available()
        kv = torch.zeros(2, 1, 2, 4, 1, 16)
        key = torch.arange(32.0).view(2, 1, 16)
        reshape_and_cache(key, -key, kv[:, 0, 0], kv[:, 0, 1], torch.tensor([5, -1]))
        assert torch.equal(kv[1, 0, 0, 1], key[0]) and torch.equal(kv[1, 0, 1, 1], -key[0])
        assert int((kv != 0).sum()) == 30
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 64, 80, 128, 129)] == [1, 1, 2, 4, 64, 128, 128, 256]


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        _ = kernels.no_such_kernel
