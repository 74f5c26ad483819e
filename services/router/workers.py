"""The router's CPU work (tokenization, chat templates) on worker threads, off the event loop.

HF fast tokenizers release the GIL while they encode, so a 100 KB prompt tokenized here does
not stall other streams or ``/health``; chat templates are Python (Jinja) and share the GIL in
5 ms slices. One thread per CPU the process may use: more would only queue on the GIL or the
cores. ``trim_heap`` hands freed memory back to the OS (``malloc_trim``); the HTTP guard calls
it after a big request, since glibc keeps freed pages in each thread's arena otherwise and a burst
of large prompts would leave the router's RSS high for good.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give free heap pages back to the OS (glibc), a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class CPUPool:
    """A thread pool sized by the CPUs, for blocking work the event loop must not wait on."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or cpu_count()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="router-cpu")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on a worker; its exception is raised here."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
