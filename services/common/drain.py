"""Graceful drain of an engine server: stop taking new work, finish what is in flight, then go.

On SIGTERM (Kubernetes deleting the pod: scale-down, rollout, node drain) a server

1. answers gRPC health NOT_SERVING and ``EngineStats.serving = false`` (reason ``draining``),
   so the kubelet marks the pod not ready and the router stops choosing it (the EndpointSlice
   already lists it as terminating);
2. refuses new requests with UNAVAILABLE, which the router retries on another pod before any
   token reached the client (a request routed in the moment before the router learned);
3. keeps serving everything already running: decode streams run to their last token, prefill
   pods finish their prompts and keep answering KV reads until every lease is released by its
   decode pod or expires;
4. exits when nothing is left, or when ``--drain-seconds`` have passed (what is still running
   then is cut; the pod's terminationGracePeriodSeconds leaves room for that deadline).

One ``Drain`` per server process, shared by its servicers; it runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc

log = logging.getLogger(__name__)

DRAINING_REASON = "draining"
DEFAULT_DRAIN_SECONDS = 60.0
_POLL_S = 0.1


class Drain:
    """Whether the server is draining, and the calls it must still finish."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0  # calls counted by ``track`` (decode streams, prefill prompts)
        self.refused = 0  # calls refused since the drain began
        self._woken = asyncio.Event()  # binds to the loop that first waits on it

    def begin(self) -> None:
        """Stop taking new work (idempotent)."""
        self.draining = True

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a call in flight for its whole life (a stream until its last message)."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        """Abort a new call with UNAVAILABLE while draining: the router retries elsewhere."""
        if self.draining:
            self.refused += 1
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{DRAINING_REASON}: this pod is shutting down and takes no new requests",
            )

    def wake(self) -> None:
        """End ``wait`` now (a second signal: the operator wants the process gone)."""
        self._woken.set()

    async def wait(self, deadline_s: float, idle: Callable[[], bool] = lambda: True) -> bool:
        """Until nothing is in flight and ``idle()`` (e.g. no live KV lease), at most
        ``deadline_s``; True when drained, False when the deadline (or ``wake``) came first."""
        start = time.monotonic()
        end = start + max(0.0, deadline_s)
        while True:
            if self.inflight == 0 and idle():
                log.info("drained in %.1f s", time.monotonic() - start)
                return True
            left = end - time.monotonic()
            if left <= 0 or self._woken.is_set():
                log.warning(
                    "drain ended after %.1f s with %d calls still in flight",
                    time.monotonic() - start, self.inflight,
                )  # fmt: skip
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=min(_POLL_S, left))
