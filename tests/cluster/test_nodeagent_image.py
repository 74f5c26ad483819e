"""The image's facts come from the Dockerfile alone; its file list is what `docker build` copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.cluster import dockerfile, image

REPO = image.REPO


def test_runtime_config_of_the_real_dockerfile() -> None:
    facts = dockerfile.read(REPO / "Dockerfile")
    rt = facts.runtime
    assert facts.prefix == "/opt/splitserve"
    assert rt.entrypoint == ["splitserve"] and rt.cmd == ["--help"]
    assert rt.user == "10001:10001" and rt.workdir == "/home/splitserve"
    assert rt.env["PATH"].startswith("/opt/splitserve/bin:")
    for key, value in {
        "PYTHONSAFEPATH": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/home/splitserve",
    }.items():
        assert rt.env[key] == value
    assert "HF_HOME" in rt.env
    # The install steps are the shared script, copied in before it runs.
    assert "scripts/image-install.sh" in facts.copied_paths
    assert {"pyproject.toml", "splitserve", "operator"} <= set(facts.copied_paths)


def test_install_script_pins_torch_exactly() -> None:
    script = (REPO / "scripts" / "image-install.sh").read_text()
    assert "torch==" in script  # it insists on an exact pin in pyproject.toml
    assert 'torch==2.13.0"' in (REPO / "pyproject.toml").read_text()


def test_parser_handles_continuations_and_stages(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "ARG V=1\nFROM base AS build\nCOPY a b ./\nRUN x/image-install.sh /opt/p /src deps\n"
        'FROM final\n# comment\nENV A=1 \\\n    B=$A:2\nENTRYPOINT ["e"]\nCMD ["c"]\n'
        'ENTRYPOINT ["e2"]\nUSER 5:6\n'
    )
    facts = dockerfile.read(path)
    assert facts.copied_paths == ["a", "b"] and facts.prefix == "/opt/p"
    assert facts.runtime.env["B"] == "1:2"
    assert facts.runtime.entrypoint == ["e2"] and facts.runtime.cmd == []  # ENTRYPOINT resets CMD
    assert facts.runtime.user == "5:6"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("splitserve/__pycache__/x.pyc", True),
        ("a/b.pyc", True),
        ("tests/x.py", True),
        ("splitserve.egg-info/PKG-INFO", True),
        ("splitserve/cli.py", False),
    ],
)
def test_dockerignore_matching(path: str, ignored: bool) -> None:
    patterns = ["**/__pycache__", "**/*.pyc", "*.egg-info", "tests"]
    assert dockerfile.ignored(path, patterns) is ignored


def test_source_files_are_the_build_context_subset() -> None:
    facts = dockerfile.read(REPO / "Dockerfile")
    files = image.source_files(REPO, facts)
    assert "pyproject.toml" in files and "scripts/image-install.sh" in files
    assert not any(f.startswith(("tests/", "cluster/", "docs/")) for f in files)
    assert not any("__pycache__" in f for f in files)


def test_the_venv_runs_at_the_dockerfiles_prefix() -> None:
    argv = image.at_prefix(["splitserve", "--help"])
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert argv[-2:] == ["splitserve", "--help"]


def test_dependency_facts_ignore_tool_settings(tmp_path: Path) -> None:
    base = (
        '[build-system]\nrequires = ["setuptools"]\n[project]\ndependencies = ["torch==2.13.0"]\n'
    )
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(base)
    b.write_text(base + '[tool.pytest.ini_options]\nmarkers = ["x"]\n')
    assert image.dependency_facts(a) == image.dependency_facts(b)
    b.write_text(base.replace("2.13.0", "2.14.0"))
    assert image.dependency_facts(a) != image.dependency_facts(b)
