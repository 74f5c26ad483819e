"""The container runtime's agent side: start containers with launch.py, signal them, exec in them.

Every process is spawned from one long-lived thread (`Spawner`): PR_SET_PDEATHSIG fires when the
*thread* that forked a process ends, so spawning from short-lived worker threads would kill the
containers with them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("launch.py")
START_TIMEOUT_S = 60.0


class StartError(Exception):
    """The container's process could not be started (kubelet: StartError / RunContainerError)."""


class Spawner:
    """Runs `subprocess.Popen` on one dedicated thread that lives as long as the agent."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        fut: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((lambda: subprocess.Popen(argv, **kw), fut))
        return fut.result(timeout=30)

    def stop(self) -> None:
        self._jobs.put(None)


@dataclass
class LaunchSpec:
    """What launch.py needs to start one container (serialised as JSON)."""

    argv: list[str]
    env: dict[str, str]
    workdir: str
    uid: int
    gid: int
    groups: list[int]
    netns: str | None  # None: the host's network namespace (hostNetwork)
    hostname: str | None  # None: the host's UTS namespace
    scratch: str
    readonly_root: bool
    mounts: list[dict[str, Any]] = field(default_factory=list)
    dirs: list[tuple[str, int, int, int]] = field(default_factory=list)
    files: list[tuple[str, str, int]] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    scratch_size: str = "2g"
    shm_size: str = "64m"


@dataclass
class ContainerProcess:
    """One running container: the shim (our child) and the container's init (its child)."""

    shim: subprocess.Popen[bytes]
    init_pid: int
    started_at: float
    spec: LaunchSpec

    def exit_code(self) -> int | None:
        """None while running; else the container's exit code (128+signal when killed)."""
        code = self.shim.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code  # the shim itself killed: -9 -> 137

    def terminate(self) -> None:
        """SIGTERM to the container's init (via the shim, which forwards it)."""
        _signal(self.shim.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the init (its PID namespace dies with it), then the shim."""
        _signal(self.init_pid, signal.SIGKILL)
        _signal(self.shim.pid, signal.SIGKILL)

    def wait(self, timeout_s: float) -> int | None:
        try:
            self.shim.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Runtime:
    """Starts containers and runs commands in them; all through launch.py."""

    def __init__(self, spawner: Spawner, work_dir: Path) -> None:
        self._spawner = spawner
        self._work_dir = work_dir
        self._python = sys.executable

    def _spec_file(self, directory: Path, name: str, data: dict[str, Any]) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the env
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        return path

    def start(self, spec: LaunchSpec, container_dir: Path, log_path: Path) -> ContainerProcess:
        """Start the container; returns once its command has been exec'd (or raises)."""
        read_fd, write_fd = os.pipe()
        data = spec.__dict__ | {"mode": "run", "status_fd": write_fd, "agent_pid": os.getpid()}
        path = self._spec_file(container_dir, "launch.json", data)
        Path(spec.scratch).mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as logf:
                shim = self._spawner.popen(
                    [self._python, "-I", "-S", str(LAUNCHER), str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    cwd="/",
                )
        finally:
            os.close(write_fd)
        try:
            lines = _read_all(read_fd, START_TIMEOUT_S)
        finally:
            os.close(read_fd)
        started = time.time()
        pid = next((int(x.split()[1]) for x in lines if x.startswith("pid ")), None)
        errors = [x.removeprefix("error ") for x in lines if x.startswith("error ")]
        if errors or pid is None:
            _signal(shim.pid, signal.SIGKILL)
            shim.wait(timeout=10)
            raise StartError(errors[0] if errors else "the launcher exited before starting")
        record_pids(container_dir / "pids", [shim.pid, pid])
        return ContainerProcess(shim, pid, started, spec)

    def exec_in(
        self, proc: ContainerProcess, argv: list[str], timeout_s: float
    ) -> tuple[int | None, str]:
        """Run argv in the container as its user with its env; (exit code or None, output)."""
        data = {
            "mode": "exec",
            "target_pid": proc.init_pid,
            "argv": argv,
            "env": proc.spec.env,
            "workdir": proc.spec.workdir,
            "uid": proc.spec.uid,
            "gid": proc.spec.gid,
            "groups": proc.spec.groups,
        }
        path = self._spec_file(self._work_dir, f"exec-{threading.get_ident()}.json", data)
        child = self._spawner.popen(
            [self._python, "-I", "-S", str(LAUNCHER), str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
        try:
            out, _ = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            return None, out.decode(errors="replace")
        finally:
            path.unlink(missing_ok=True)
        return child.returncode, out.decode(errors="replace")


def start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (tells a reused PID apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def record_pids(path: Path, pids: list[int]) -> None:
    """Note processes the agent started, so a later agent can kill them if they outlive it."""
    lines = [f"{pid} {start_time(pid)}" for pid in pids]
    path.write_text("\n".join(lines) + "\n")


def kill_recorded(path: Path) -> int:
    """SIGKILL the recorded processes that still run (same PID and start time); how many."""
    killed = 0
    for line in path.read_text().splitlines():
        pid_text, _, started = line.partition(" ")
        if pid_text.isdigit() and start_time(int(pid_text)) == started:
            _signal(int(pid_text), signal.SIGKILL)
            killed += 1
    return killed


def _read_all(fd: int, timeout_s: float) -> list[str]:
    """Lines from the status pipe until every writer has closed it (exec or exit)."""
    deadline = time.monotonic() + timeout_s
    chunks = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartError(f"the container did not start within {timeout_s:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return chunks.decode(errors="replace").splitlines()
        chunks += data
