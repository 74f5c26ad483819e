"""The local cluster's "image": a venv made by the Dockerfile's own install steps.

No container runtime runs here, so the node agent runs every container as processes from one venv
(`.cache/cluster/image/venv-<hash>`). It is built by `scripts/image-install.sh` - the script the
Dockerfile runs - on a clean copy of exactly the files the Dockerfile's build stage COPYs (tracked
or untracked-but-not-ignored files, minus .dockerignore), never from the development venv, and at
the Dockerfile's own prefix: /opt/splitserve, where the venv is bind-mounted inside a private
mount namespace (nothing is created on the host), as it is in every container. The runtime facts
(ENV, WORKDIR, USER, ENTRYPOINT, CMD) are read from the Dockerfile's final stage and saved beside
the venv as `config.json`, which the node agent reads. Building needs root (the namespace).

Caching: a change of the install script, of pyproject.toml's dependencies or of the base
interpreter rebuilds the venv from scratch (about 3-4 minutes here, nearly all of it unpacking
torch and its CUDA wheels: downloads take seconds, and pip's cache keeps nothing of PyPI's files,
which carry no cache headers); a change of source files only re-runs the script's `package` step
(a `--no-deps --force-reinstall` wheel install, seconds).

    python -P -m splitserve.cluster.image build [--force]
    python -P -m splitserve.cluster.image show
    python -P -m splitserve.cluster.image exec -- splitserve --help   # run from the image
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from splitserve.cluster import dockerfile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = Path(".cache/cluster/image")  # config.json, venv-<deps hash>/, src/
CONFIG_NAME = "config.json"
# Interpreters tried for the venv's base, in order: it must be readable by the image's non-root
# user (pyenv's under /root is not), as python:3.x-slim's /usr/local/bin/python is.
BASE_PYTHONS = ("/usr/local/bin/python3.11", "/usr/bin/python3.11", "/usr/bin/python3.12")


@dataclass(frozen=True)
class ImageConfig:
    """What a container started from the image gets: its runtime environment and entry point."""

    id: str
    venv: str
    prefix: str
    python: str
    env: dict[str, str]
    workdir: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    exposed_ports: list[int]
    deps_hash: str
    source_hash: str

    @property
    def uid_gid(self) -> tuple[int, int]:
        """The image's USER as numbers (the Dockerfile uses numeric `UID:GID`)."""
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)


def load(image_dir: Path) -> ImageConfig:
    """The config of a built image; FileNotFoundError if none has been built there."""
    data = json.loads((image_dir / CONFIG_NAME).read_text())
    return ImageConfig(**data)


def world_usable(path: Path) -> bool:
    """Whether any user may run `path`: every parent folder searchable, the file readable."""
    real = path.resolve()
    for parent in [*reversed(real.parents)]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(real).st_mode & stat.S_IROTH)


def default_python() -> str:
    """A Python 3.11+ with venv support that the image's non-root user can run."""
    for candidate in BASE_PYTHONS:
        path = Path(candidate)
        if not path.exists() or not world_usable(path):
            continue
        probe = subprocess.run(
            [candidate, "-I", "-c", "import ensurepip, venv"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            return candidate
    log.warning("no world-readable Python found; pods running as non-root may fail to start")
    return sys._base_executable  # type: ignore[attr-defined]


def source_files(repo: Path, facts: dockerfile.DockerfileFacts) -> list[str]:
    """Context-relative files the build stage copies, as `docker build` would send them."""
    listed = (
        subprocess.run(
            [
                "git",
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
                *facts.copied_paths,
            ],
            cwd=repo,
            check=True,
            capture_output=True,
            timeout=60,
        )
        .stdout.decode()
        .split("\0")
    )
    patterns = dockerfile.ignore_patterns(repo / ".dockerignore")
    files = {f for f in listed if f and (repo / f).is_file()}
    return sorted(f for f in files if not dockerfile.ignored(f, patterns))


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def dependency_facts(pyproject: Path) -> bytes:
    """The parts of pyproject.toml the `deps` step reads (tool settings do not rebuild torch)."""
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    keep = {
        "build-system": data.get("build-system", {}).get("requires", []),
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return json.dumps(keep, sort_keys=True).encode()


def deps_hash(repo: Path, python: str, prefix: str) -> str:
    """Changes when a full rebuild is needed: install steps, dependencies, base interpreter."""
    version = subprocess.run(
        [python, "-I", "-c", "import sys; print(sys.version)"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    return _digest(
        [
            (repo / "scripts" / dockerfile.INSTALL_SCRIPT).read_bytes(),
            dependency_facts(repo / "pyproject.toml"),
            python.encode(),
            version,
            prefix.encode(),
        ]
    )


def source_hash(repo: Path, files: list[str]) -> str:
    """Changes when any copied file changes (name, content or executable bit)."""
    parts: list[bytes] = []
    for rel in files:
        path = repo / rel
        parts += [rel.encode(), b"x" if os.access(path, os.X_OK) else b"-", path.read_bytes()]
    return _digest(parts)


def _copy_sources(repo: Path, files: list[str], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def _discard(paths: list[Path], trash: Path) -> None:
    """Move folders aside and delete them in the background (a 5 GB venv takes minutes to
    unlink on this disk, and nothing needs to wait for that)."""
    trash.mkdir(exist_ok=True)
    for path in paths:
        if path.exists():
            path.rename(trash / f"{path.name}-{time.time_ns()}")
    leftovers = [str(p) for p in trash.iterdir()]
    if leftovers:
        subprocess.Popen(
            ["rm", "-rf", *leftovers],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


# Shows the image venv at the Dockerfile's prefix, inside a private mount namespace only: an
# overlay on the prefix's parent (so nothing is created on the host) with the venv bound into it.
_AT_PREFIX = """
set -e
mount -t tmpfs tmpfs "$SS_SCRATCH"
mkdir "$SS_SCRATCH/upper" "$SS_SCRATCH/work"
mount -t overlay overlay \
    -o "lowerdir=$SS_PARENT,upperdir=$SS_SCRATCH/upper,workdir=$SS_SCRATCH/work" "$SS_PARENT"
mkdir -p "$SS_PREFIX"
mount --bind "$SS_VENV" "$SS_PREFIX"
exec "$@"
"""


def at_prefix(argv: list[str]) -> list[str]:
    """A command line running `argv` with the venv at the prefix (root; env from _prefix_env).

    The venv is built and runs at the Dockerfile's own prefix (/opt/splitserve): its scripts'
    shebangs and paths are the image's, and a pod's volumes cannot hide it.
    """
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _AT_PREFIX, "sh", *argv]


def _prefix_env(venv: Path, prefix: str) -> dict[str, str]:
    parent = str(Path(prefix).parent)
    if not Path(parent).is_dir():
        raise RuntimeError(f"{parent} does not exist: the image's prefix needs it as a mount point")
    scratch = venv.parent / ".mnt"
    scratch.mkdir(exist_ok=True)
    return {
        "SS_SCRATCH": str(scratch),
        "SS_PARENT": parent,
        "SS_PREFIX": prefix,
        "SS_VENV": str(venv),
    }


def _install(repo: Path, python: str, venv: Path, prefix: str, src: Path, step: str) -> float:
    if os.geteuid() != 0:
        raise RuntimeError("the image venv is built in a mount namespace: run as root")
    script = repo / "scripts" / dockerfile.INSTALL_SCRIPT
    env = (
        os.environ
        | _prefix_env(venv, prefix)
        | {
            "PYTHON": python,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
        }
    )
    env.pop("PIP_NO_CACHE_DIR", None)
    env.pop("VIRTUAL_ENV", None)
    venv.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    log.info("image: %s %s %s %s (at %s)", script.name, prefix, src, step, venv)
    argv = at_prefix(["sh", str(script), prefix, str(src), step])
    subprocess.run(argv, cwd=venv.parent, env=env, check=True)
    return time.monotonic() - began


def run_in_image(config: ImageConfig, argv: list[str]) -> int:
    """Run a command from the image on the host (its ENV, the venv at its prefix): debugging."""
    env = dict(config.env) | _prefix_env(Path(config.venv), config.prefix)
    return subprocess.run(at_prefix(argv), env=env).returncode


def build(
    repo: Path = REPO,
    image_dir: Path | None = None,
    *,
    python: str | None = None,
    force: bool = False,
) -> ImageConfig:
    """Build or refresh the image venv; returns its config. Concurrent builds wait for one."""
    image_dir = (image_dir or repo / IMAGE_DIR).resolve()
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(image_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(repo, image_dir, python or default_python(), force)


def _build_locked(repo: Path, image_dir: Path, python: str, force: bool) -> ImageConfig:
    facts = dockerfile.read(repo / "Dockerfile")
    files = source_files(repo, facts)
    wanted_deps = deps_hash(repo, python, facts.prefix)
    wanted_src = source_hash(repo, files)
    src = image_dir / "src"
    try:
        current: ImageConfig | None = load(image_dir)
    except (FileNotFoundError, TypeError, json.JSONDecodeError):
        current = None
    if current is not None and not Path(current.venv).is_dir():
        current = None
    full = force or current is None or current.deps_hash != wanted_deps
    if not full and current is not None and current.source_hash == wanted_src:
        log.info("image: up to date (%s)", current.id[:12])
        return current
    began = time.monotonic()
    _copy_sources(repo, files, src)
    if full or current is None:
        # A new folder per dependency set: running pods keep the venv they started from, and the
        # config switches to the new one only once it is complete.
        venv = image_dir / f"venv-{wanted_deps[:12]}"
        _discard([venv], image_dir / "trash")
        took = _install(repo, python, venv, facts.prefix, src, "all")
        log.info("image: full build took %.1f s", took)
        keep = {venv, Path(current.venv) if current else venv}
        _discard([p for p in image_dir.glob("venv*") if p not in keep], image_dir / "trash")
    else:
        venv = Path(current.venv)
        took = _install(repo, python, venv, facts.prefix, src, "package")
        log.info("image: package step took %.1f s", took)
    log.info("image: %.1f s in all", time.monotonic() - began)
    config = ImageConfig(
        id=_digest([wanted_deps.encode(), wanted_src.encode()]),
        venv=str(venv),
        prefix=facts.prefix,
        python=python,
        env=dict(facts.runtime.env),
        workdir=facts.runtime.workdir,
        user=facts.runtime.user,
        entrypoint=facts.runtime.entrypoint,
        cmd=facts.runtime.cmd,
        exposed_ports=facts.runtime.exposed_ports,
        deps_hash=wanted_deps,
        source_hash=wanted_src,
    )
    tmp = image_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
    tmp.replace(image_dir / CONFIG_NAME)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -P -m splitserve.cluster.image")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or refresh the image venv")
    b.add_argument("--force", action="store_true", help="rebuild from scratch")
    b.add_argument("--python", help="base interpreter (default: a world-readable python3.11)")
    b.add_argument("--image-dir", type=Path, help=f"default: <repo>/{IMAGE_DIR}")
    s = sub.add_parser("show", help="print the built image's config")
    s.add_argument("--image-dir", type=Path, help=f"default: <repo>/{IMAGE_DIR}")
    e = sub.add_parser("exec", help="run a command from the image: exec -- splitserve --help")
    e.add_argument("--image-dir", type=Path, help=f"default: <repo>/{IMAGE_DIR}")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        began = time.monotonic()
        config = build(REPO, args.image_dir, python=args.python, force=args.force)
        print(f"image {config.id[:12]} at {config.venv} ({time.monotonic() - began:.1f} s)")
        return 0
    image_dir = args.image_dir or REPO / IMAGE_DIR
    if args.command == "exec":
        command = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
        return run_in_image(load(image_dir), command or ["splitserve", "--help"])
    print(json.dumps(asdict(load(image_dir)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
