"""Give freed native heap memory back to the OS (glibc ``malloc_trim``).

A prefill engine allocates activations of a different size every step (prompts of 5 to 2,048
tokens): glibc keeps freed chunks in its arenas for reuse, fragmented, and the process RSS ratchets
up although nothing is live. Trimming between steps, when the engine goes idle and at most every
``interval`` seconds under load, returns those pages; it costs a few milliseconds. A no-op where
the C library has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _trim = None


class HeapTrimmer:
    """Call ``maybe_trim`` between steps; it trims when due."""

    def __init__(self, interval: float | None = None, clock=time.monotonic) -> None:
        # SPLITSERVE_HEAP_TRIM_SECONDS: the period (default 30 s); 0 turns trimming off, which
        # is how the growth it prevents is shown (docs/memory.md).
        if interval is None:
            interval = float(os.environ.get("SPLITSERVE_HEAP_TRIM_SECONDS", "30"))
        self.enabled = interval > 0
        self.interval = interval
        self._clock = clock
        self._last = clock()
        self.trims = 0

    def maybe_trim(self, idle: bool) -> bool:
        """Trim now if the engine just went idle or ``interval`` passed; True if it did."""
        now = self._clock()
        if _trim is None or not self.enabled or not (idle or now - self._last >= self.interval):
            return False
        _trim(0)
        self._last = now
        self.trims += 1
        return True
