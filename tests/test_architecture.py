"""docs/architecture.md stays true: every folder and module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _sections() -> dict[str, str]:
    """Heading -> body of each ``##`` section."""
    parts = re.split(r"^## (.+)$", DOC, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_folder_named_exists():
    table = _sections()["Folders and their jobs"]
    folders = re.findall(r"^\| `([^`]+/)`", table, flags=re.M)
    assert len(folders) >= 10
    for folder in folders:
        assert (ROOT / folder).is_dir(), folder
    for imported in re.findall(r"\| `(splitserve(?:\.\w+)*)` \|", table):
        parts = imported.split(".")[1:]
        # a top-level folder mapped by setup.py (engine/ -> splitserve.engine), or a subpackage
        # of splitserve/ itself (splitserve/protocol/ -> splitserve.protocol)
        rel = "/".join(parts)
        candidates = [ROOT / rel, ROOT / "splitserve" / rel] if parts else [ROOT / "splitserve"]
        assert any(p.is_dir() for p in candidates), imported


def test_every_module_named_exists():
    for heading, folder in (
        ("The contracts (`splitserve/protocol/`)", "splitserve/protocol"),
        ("The engine (`engine/`)", "engine"),
    ):
        body = _sections()[heading]
        modules = re.findall(r"^\| `([\w/]+(?:\.py)?/?)`(?:, `([\w/]+\.py)`)?", body, flags=re.M)
        names = [m for pair in modules for m in pair if m]
        assert len(names) >= 8, heading
        for name in names:
            assert (ROOT / folder / name).exists(), f"{folder}/{name}"


def test_paths_in_the_request_path_exist():
    for path in re.findall(r"\[((?:services|splitserve|engine|kvtransfer)/[\w/.]+)\]", DOC):
        assert (ROOT / path).exists(), path
    for path in re.findall(r"with (splitserve/protocol/\w+\.py)", DOC):
        assert (ROOT / path).exists(), path
