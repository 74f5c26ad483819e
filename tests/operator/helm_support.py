"""Running the helm binary from the chart tests (imported by test_charts and test_monitoring)."""

from __future__ import annotations

import subprocess


def helm_run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False, timeout=120)
