"""Reads the facts the local cluster needs from the Dockerfile, so they are written only there.

The Dockerfile stays the one description of the image: which files its build stage copies, the
prefix its venv is installed at (the `image-install.sh PREFIX SRC` step), and the final stage's
runtime configuration (ENV, WORKDIR, USER, ENTRYPOINT, CMD, EXPOSE). Only the forms the Dockerfile
uses are understood (KEY=VALUE ENV, JSON ENTRYPOINT/CMD); anything else is an error, not a guess.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# python:3.x-slim's PATH (Debian's default with /usr/local/bin first), which `$PATH` extends.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTALL_SCRIPT = "image-install.sh"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword and its raw argument text."""

    keyword: str
    text: str


@dataclass
class Stage:
    """A FROM ... stage and its instructions, in order."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass(frozen=True)
class RuntimeConfig:
    """The final stage's runtime facts, like an OCI image config."""

    env: dict[str, str]
    workdir: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    exposed_ports: list[int]


@dataclass(frozen=True)
class DockerfileFacts:
    """Everything the cluster's image builder and node agent take from the Dockerfile."""

    copied_paths: list[str]  # build-stage COPY sources, relative to the context
    prefix: str  # where image-install.sh puts the venv
    runtime: RuntimeConfig


def instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append(Instruction(keyword.upper(), rest.strip()))
    if pending.strip():
        raise ValueError("Dockerfile ends inside a continued instruction")
    return out


def stages(items: list[Instruction]) -> list[Stage]:
    """Group instructions by FROM; ARGs before the first FROM are dropped."""
    out: list[Stage] = []
    for item in items:
        if item.keyword == "FROM":
            words = item.text.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            out.append(Stage(base=words[0], name=name))
        elif out:
            out[-1].instructions.append(item)
    if not out:
        raise ValueError("Dockerfile has no FROM")
    return out


def _env_pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV must use KEY=VALUE form: {text!r}")
        pairs.append((key, value))
    return pairs


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)


def _json_list(item: Instruction) -> list[str]:
    value = json.loads(item.text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{item.keyword} must be a JSON list of strings: {item.text!r}")
    return value


def runtime_config(stage: Stage) -> RuntimeConfig:
    """ENV/WORKDIR/USER/ENTRYPOINT/CMD/EXPOSE of a stage (the final one is the image)."""
    env = {"PATH": BASE_PATH}
    workdir, user = "/", "0:0"
    entrypoint: list[str] = []
    cmd: list[str] = []
    ports: list[int] = []
    for item in stage.instructions:
        if item.keyword == "ENV":
            for key, value in _env_pairs(item.text):
                env[key] = _expand(value, env)
        elif item.keyword == "WORKDIR":
            workdir = item.text
        elif item.keyword == "USER":
            user = item.text
        elif item.keyword == "ENTRYPOINT":
            entrypoint = _json_list(item)
            cmd = []  # Docker resets CMD when ENTRYPOINT is set
        elif item.keyword == "CMD":
            cmd = _json_list(item)
        elif item.keyword == "EXPOSE":
            ports += [int(p.split("/")[0]) for p in item.text.split()]
    return RuntimeConfig(env, workdir, user, entrypoint, cmd, ports)


def _copied_paths(stage: Stage) -> list[str]:
    paths = []
    for item in stage.instructions:
        if item.keyword != "COPY" or "--from=" in item.text:
            continue
        words = [w for w in item.text.split() if not w.startswith("--")]
        paths += words[:-1]
    return paths


def _install_prefix(stage: Stage) -> str:
    for item in stage.instructions:
        if item.keyword == "RUN" and INSTALL_SCRIPT in item.text:
            words = shlex.split(item.text)
            at = next(i for i, w in enumerate(words) if w.endswith(INSTALL_SCRIPT))
            return words[at + 1]
    raise ValueError(f"the build stage never runs {INSTALL_SCRIPT}")


def read(path: Path) -> DockerfileFacts:
    """Parse the repository's Dockerfile: the first stage builds, the last one is the image."""
    all_stages = stages(instructions(path.read_text()))
    build, final = all_stages[0], all_stages[-1]
    return DockerfileFacts(_copied_paths(build), _install_prefix(build), runtime_config(final))


def ignore_patterns(path: Path) -> list[str]:
    """.dockerignore patterns (comments and blank lines dropped; `!` exceptions unsupported)."""
    if not path.exists():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise ValueError(f".dockerignore exceptions are not supported: {line}")
        patterns.append(line.rstrip("/"))
    return patterns


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether a context-relative path, or one of its parent folders, matches a pattern."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            # `**/x` matches x at any depth, including the top.
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], bare):
                return True
    return False
