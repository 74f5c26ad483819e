"""Keep one OpenMP team in a server process: the engine thread's.

torch's CPU ops run their parallel regions on GNU OpenMP (libgomp). Every thread that ever runs
one keeps a pool of worker threads for good, and libgomp counts them all: once a process holds
more of them than it has CPUs, it cuts every worker's spin-wait between regions to ~100 spins,
so each of the engine's ~200 parallel regions per decode step pays a futex wake-up of its worker.
In a server, where the model is loaded on the main thread and steps run on the engine thread,
that made a batch-1 decode step 1.6x slower on 2 CPUs (23.5 vs 14.8 ms a token for SmolLM2
w8a8; docs/performance.md, "Threads").

``in_own_thread`` runs a function (the engine's construction: loading, quantizing, warming up)
on a thread that then exits, taking its OpenMP workers with it. ``serial_in_this_thread`` makes
torch ops of the calling thread (the server's event loop) run without a team of their own.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def in_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread, joined before its result (or exception) is returned here."""
    with ThreadPoolExecutor(1, thread_name_prefix="engine-build") as pool:
        return pool.submit(fn).result()


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (its own copy in pip wheels), or None (another runtime)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = Path(line.split()[-1])
        if path.name.startswith("libgomp"):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def serial_in_this_thread() -> bool:
    """torch ops on the calling thread run on it alone from now on (other threads keep their
    thread counts); False where torch does not use libgomp (nothing changed)."""
    gomp = _libgomp()
    if gomp is None or not torch.backends.openmp.is_available():
        return False
    torch.get_num_threads()  # torch sets this thread's OpenMP thread count on its first use
    gomp.omp_set_num_threads(1)
    return True
