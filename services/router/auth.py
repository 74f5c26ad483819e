"""API keys: flags, an environment variable and a mounted Secret file, re-read when it changes.

Kubernetes updates a mounted Secret in place (an atomic symlink swap), so rotating a key must not
need a router restart: the file is re-read when its mtime changes, checked at most every
``recheck_s``. A file that vanishes mid-swap keeps the last keys rather than locking everyone out.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterable


def parse_keys(text: str) -> set[str]:
    """Keys separated by newlines or commas; blanks dropped."""
    return {k.strip() for k in text.replace(",", "\n").splitlines() if k.strip()}


class ApiKeys:
    def __init__(
        self,
        static: Iterable[str] = (),
        key_file: str | None = None,
        *,
        recheck_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._static = frozenset(k.strip() for k in static if k.strip())
        self._file = key_file
        self._recheck_s = recheck_s
        self._clock = clock
        self._mtime: float | None = None
        self._checked = float("-inf")
        self._from_file: frozenset[str] = frozenset()
        if key_file is not None:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all (any source configured)."""
        return bool(self._static) or self._file is not None

    def _reload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked < self._recheck_s:
            return
        self._checked = now
        try:
            mtime = os.stat(self._file).st_mtime  # type: ignore[arg-type]
            if force or mtime != self._mtime:
                with open(self._file) as f:  # type: ignore[arg-type]
                    self._from_file = frozenset(parse_keys(f.read()))
                self._mtime = mtime
        except OSError:
            if force:
                raise

    def current(self) -> frozenset[str]:
        if self._file is not None:
            self._reload()
        return self._static | self._from_file

    def check(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header value carries a valid bearer key."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        # Compare against every key in constant time: no early exit that leaks which one matched.
        ok = False
        for key in self.current():
            ok |= hmac.compare_digest(token.encode(), key.encode())
        return ok
