"""Progress of a download as log lines (a pod's log is read by people, not a terminal)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("splitserve.storage")


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@dataclass
class Progress:
    """Counts files and bytes as they complete and logs one line per file."""

    total_files: int
    total_bytes: int
    done_files: int = 0
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def file_done(self, name: str, size: int, *, fetched: bool) -> None:
        self.done_files += 1
        self.done_bytes += size
        elapsed = max(time.monotonic() - self.started, 1e-3)
        verb = "fetched" if fetched else "present"
        log.info(
            "%s %s (%s) [%d/%d files, %s of %s, %s/s]",
            verb, name, human(size), self.done_files, self.total_files,
            human(self.done_bytes), human(self.total_bytes), human(self.done_bytes / elapsed),
        )  # fmt: skip
