"""Repository-wide checks: style (ruff, 100 columns) and the package layout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    result = subprocess.run([RUFF, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_package_never_shadows_the_stdlib():
    import operator

    assert Path(operator.__file__).parent != ROOT / "operator"
    import splitserve.operator

    assert Path(splitserve.operator.__file__).parent == ROOT / "operator"
