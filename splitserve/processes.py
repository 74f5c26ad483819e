"""Child processes the way every splitserve launcher starts them (serve, tests, benchmarks).

- ``spawn``: ``python -P -m splitserve ...`` (or any argv) in its own session, so a terminal's
  Ctrl-C reaches only the launcher, which stops its children in order; and with
  ``PR_SET_PDEATHSIG`` so the kernel sends the child SIGTERM when the launcher dies, even by
  SIGKILL: no engine outlives the command that started it.
- ``stop``: SIGTERM, wait, then SIGKILL what is still there.
- ``free_port`` / ``port_in_use``: one implementation of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO

_PR_SET_PDEATHSIG = 1
# Resolved once in the parent: between fork and exec the child must only call into C, never
# load a library (another thread of the parent may have held the loader's lock at fork time).
_prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl


def splitserve_argv(*args: str) -> list[str]:
    """The command line of ``splitserve ARGS`` with this interpreter (``-P``: the working
    directory never lands on sys.path, so the repository's ``operator/`` cannot shadow the
    standard library)."""
    return [sys.executable, "-P", "-m", "splitserve", *args]


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the parent goes away."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    output: IO | int | None = None,
    new_session: bool = True,
    die_with_parent: bool = True,
) -> subprocess.Popen:
    """Start ``argv``; its stdout and stderr go to ``output`` (default: inherited)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONSAFEPATH", "1")
    return subprocess.Popen(
        list(argv),
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=new_session,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
    )


def stop(procs: Sequence[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM every process (in the order given), wait up to ``timeout`` in all, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (the OS picks it; another process may take it later)."""
    with socket.socket(_family(host)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` cannot be bound (something listens there, or it is reserved)."""
    with socket.socket(_family(host)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
