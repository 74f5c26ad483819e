"""`python -P -m splitserve.cluster.controlplane.supervise -- PROGRAM ARGS...`: keep one program
running, as its DaemonSet would on a real node.

kube-proxy exits by design when its Node's IPs change (or its config file does), counting on
being restarted; here nothing else would restart it. The supervisor restarts it after each
exit (back-off 1 s doubling to 30 s, reset after 60 s of running) and stops for good on SIGTERM
or SIGINT, passing the signal on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

BACKOFF_S = (1.0, 30.0)
STABLE_S = 60.0


def supervise(argv: list[str]) -> int:
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = BACKOFF_S[0]
    code = 0
    while not stopping:
        began = time.monotonic()
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping:
            break
        if time.monotonic() - began > STABLE_S:
            delay = BACKOFF_S[0]
        print(f"supervise: {argv[0]} exited with code {code}; restarting in {delay:.0f} s",
              flush=True)  # fmt: skip
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)
        delay = min(delay * 2, BACKOFF_S[1])
    return code


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m splitserve.cluster.controlplane.supervise -- PROGRAM ARGS...",
              file=sys.stderr)  # fmt: skip
        return 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
