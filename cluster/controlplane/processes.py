"""Daemons with pid files: start detached, find again, stop with SIGTERM then SIGKILL.

Each program runs in its own session (setsid), stdin from /dev/null and stdout/stderr appended
to its log file, so it outlives the `scripts/cluster up` that started it and holds no terminal or
pipe. The pid file records the pid and the process's start time (from /proc), so a recycled pid
is never mistaken for our program, nor signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProcessSpec:
    """How to run one cluster program."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    # SIGTERM, then SIGKILL after this many seconds (the node agent stops its pods meanwhile).
    stop_timeout: float = 15.0
    # Whether SIGTERM goes to the whole process group (see `stop`).
    term_group: bool = True


@dataclass
class Started:
    """A program started by this invocation: its Popen, to notice an early exit."""

    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    log: Path

    def exited(self) -> int | None:
        return self.proc.poll()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses; everything after the last ')' is regular.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def read_pid(pidfile: Path) -> int | None:
    """The live pid the file names, or None (no file, gone, or a different process now)."""
    try:
        pid_text, started = pidfile.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if start_time(pid) == started else None


def start(spec: ProcessSpec, pidfile: Path, log: Path) -> Started:
    """Start the program detached, logging to `log`, and record it in `pidfile`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ) | dict(spec.env)
    with open(log, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n=== {stamp} starting: {' '.join(spec.argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=spec.cwd,
            env=env,
            start_new_session=True,
        )
    started = start_time(proc.pid) or ""
    pidfile.write_text(f"{proc.pid} {started}\n")
    return Started(spec, proc, log)


def stop(pidfile: Path, timeout: float, term_group: bool = True) -> bool:
    """Stop the program the pid file names: SIGTERM, then SIGKILL to its process group after
    `timeout` s. SIGTERM goes to the whole group unless `term_group` is False (a program that
    stops its own children in order, like the node agent its pods). Returns True if something
    was running. Idempotent; removes the pid file."""
    pid = read_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    if term_group:
        _signal_group(pid, signal.SIGTERM)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and start_time(pid) is not None:
        _reap(pid)
        time.sleep(0.1)
    if start_time(pid) is not None:
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and start_time(pid) is not None:
            _reap(pid)
            time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The program leads its own session and group (setsid); signal the group so helpers it
    # forked go too, and the leader itself if the group is already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # A program started by this same process turns into a zombie until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
