"""Which prompt blocks each pod holds: precise (from KV events) and speculative (from routing).

The precise index mirrors each engine's prefix cache from its ``BlockStored`` / ``BlockRemoved``
events, keyed by the chained block hashes of ``engine/block_hash.py``; so it never drifts
from the engines' real cache as long as the event stream has no gap (a gap or a new epoch clears
the pod's entries and the subscriber resubscribes with a snapshot).

Events arrive after the prefill ran, so a burst of requests with a new shared prefix would scatter
before the first one's blocks are reported. The speculative index closes that window: it records
the blocks of every request the router sent to a pod. When the pod's event stream is live these
entries expire after ``speculative_ttl_s``; when it is not (events unavailable) they are the only
knowledge and live in a bounded LRU, the approximate fallback.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence


class PodBlocks:
    """One pod's known blocks. Not thread-safe: the router mutates it from its event loop."""

    def __init__(self, capacity: int, clock: Callable[[], float]) -> None:
        self.precise: set[int] = set()
        self.live = False  # a KV event stream is currently feeding `precise`
        self._speculative: OrderedDict[int, float] = OrderedDict()  # hash -> time recorded
        self._capacity = capacity
        self._clock = clock

    def store(self, hashes: Iterable[int]) -> None:
        self.precise.update(hashes)

    def remove(self, hashes: Iterable[int]) -> None:
        self.precise.difference_update(hashes)

    def clear(self) -> None:
        self.precise.clear()

    def record_routed(self, hashes: Sequence[int]) -> None:
        now = self._clock()
        spec = self._speculative
        for h in hashes:
            spec[h] = now
            spec.move_to_end(h)
        while len(spec) > self._capacity:
            spec.popitem(last=False)

    def has(self, block_hash: int, ttl_s: float, now: float) -> bool:
        if block_hash in self.precise:
            return True
        seen = self._speculative.get(block_hash)
        if seen is None:
            return False
        return not self.live or now - seen <= ttl_s

    def match(self, hashes: Sequence[int], ttl_s: float) -> int:
        """Leading blocks of ``hashes`` this pod holds (chained: stop at the first miss)."""
        now = self._clock()
        n = 0
        for h in hashes:
            if not self.has(h, ttl_s, now):
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self.precise)

    @property
    def num_speculative(self) -> int:
        return len(self._speculative)


class PrefixIndex:
    """Per-pod block sets keyed by pod id."""

    def __init__(
        self,
        *,
        speculative_ttl_s: float = 10.0,
        speculative_capacity: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.speculative_ttl_s = speculative_ttl_s
        self._capacity = speculative_capacity
        self._clock = clock
        self._pods: dict[str, PodBlocks] = {}

    def pod(self, pod_id: str) -> PodBlocks:
        blocks = self._pods.get(pod_id)
        if blocks is None:
            blocks = self._pods[pod_id] = PodBlocks(self._capacity, self._clock)
        return blocks

    def drop_pod(self, pod_id: str) -> None:
        self._pods.pop(pod_id, None)

    def match(self, hashes: Sequence[int], pod_ids: Iterable[str]) -> dict[str, int]:
        """Matched leading blocks per pod (0 for unknown pods)."""
        result = {}
        for pod_id in pod_ids:
            blocks = self._pods.get(pod_id)
            result[pod_id] = 0 if blocks is None else blocks.match(hashes, self.speculative_ttl_s)
        return result

    def record_routed(self, pod_id: str, hashes: Sequence[int]) -> None:
        self.pod(pod_id).record_routed(hashes)

    def pod_ids(self) -> list[str]:
        return list(self._pods)

    def size(self) -> tuple[int, int]:
        """(blocks known from KV events, blocks recorded as routed) over all pods; the first is
        bounded by the pods' own caches, the second by ``speculative_capacity`` per pod."""
        pods = self._pods.values()
        return sum(len(p) for p in pods), sum(p.num_speculative for p in pods)
