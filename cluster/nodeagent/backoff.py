"""kubelet's crash-loop back-off (client-go's flowcontrol.Backoff, without jitter).

The first restart of a container is immediate; each later one waits `delay` after the previous
exit, the delay doubling from `initial` up to `maximum`. A container that ran for longer than
2 x maximum since the last restart starts over at `initial`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Entry:
    delay: float
    last_update: float


class Backoff:
    """Per-key restart delays; `now` and event times are plain seconds (time.time())."""

    def __init__(self, initial: float = 10.0, maximum: float = 300.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._entries: dict[str, _Entry] = {}

    def _expired(self, event_time: float, entry: _Entry) -> bool:
        return event_time - entry.last_update > 2 * self.maximum

    def in_backoff(self, key: str, finished_at: float, now: float) -> bool:
        """Whether a container that exited at `finished_at` must still wait at `now`."""
        entry = self._entries.get(key)
        if entry is None or self._expired(finished_at, entry):
            return False
        return now - finished_at < entry.delay

    def restart_at(self, key: str, finished_at: float) -> float:
        """When the wait of a container that exited at `finished_at` ends."""
        entry = self._entries.get(key)
        if entry is None or self._expired(finished_at, entry):
            return finished_at
        return finished_at + entry.delay

    def next(self, key: str, finished_at: float, now: float) -> None:
        """Record a restart at `now` (call it when the container is started again)."""
        entry = self._entries.get(key)
        if entry is None or self._expired(finished_at, entry):
            self._entries[key] = _Entry(self.initial, now)
        else:
            entry.delay = min(entry.delay * 2, self.maximum)
            entry.last_update = now

    def delay(self, key: str) -> float:
        entry = self._entries.get(key)
        return entry.delay if entry else 0.0

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)
