"""The KV block pool: block objects made once, reference counts, an LRU free queue, prefix cache.

A block with ``ref_cnt == 0`` sits in the free queue but keeps its hash and contents, so a later
request with the same prefix can revive it (a prefix-cache hit). It is evicted (its hash forgotten)
only when ``allocate`` pops it for reuse. Freed blocks go to the tail, so the least recently used
ones are reused first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class KVBlock:
    """One block of ``block_size`` token slots in every layer's K and V cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept to verify prefix-cache hits
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) pop from the head, append, and remove anywhere."""

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise RuntimeError("no free KV block (callers must check num_free first)")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None and block.prev_free is None and block.next_free is None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


@dataclass(frozen=True)
class BlockStored:
    """A full block entered the prefix cache (published to routers as a KV event)."""

    block_hash: int
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_id: int


@dataclass(frozen=True)
class BlockRemoved:
    """A cached block was evicted: its hash no longer hits."""

    block_hash: int
    block_id: int


KVEvent = BlockStored | BlockRemoved


class BlockPool:
    """Owns every KVBlock of one engine. Not thread-safe: the engine loop is its only user."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self._cached: dict[int, KVBlock] = {}
        self._events: list[KVEvent] = []
        self.publish_events = False  # set by a server that streams KV events to routers

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix hash (at most the pool: the cache lives in the pool)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVBlock | None:
        """The cached block for ``block_hash`` if its tokens match. No side effects."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, reviving free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        """Pop ``n`` blocks for writing, evicting their cached hashes. Caller checks capacity."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; a block reaching 0 joins the free queue's tail.

        Callers pass a request's blocks tail-first, so its last blocks are reused first and the
        shared prefix (the most valuable cache) lives longest.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache(
        self, block: KVBlock, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]
    ) -> None:
        """Register a full, computed block under its hash (idempotent)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # another block already holds these tokens; keep the first
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        if self.publish_events:
            self._events.append(
                BlockStored(block_hash, parent_hash, block.token_ids, block.block_id)
            )

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            if self.publish_events:
                self._events.append(BlockRemoved(block.block_hash, block.block_id))
        block.block_hash = None
        block.token_ids = None

    def cached_blocks(self) -> list[BlockStored]:
        """Every block currently in the prefix cache, as BlockStored events (for snapshots)."""
        return [
            BlockStored(h, None, b.token_ids or (), b.block_id) for h, b in self._cached.items()
        ]

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def check_integrity(self, live_refs: dict[int, int] | None = None) -> None:
        """Assert the pool's invariants; ``live_refs`` maps block id -> expected ref count."""
        free_ids = [b.block_id for b in self.free_queue]
        assert len(free_ids) == len(set(free_ids)) == self.num_free_blocks
        for block in self.blocks:
            in_free = block.prev_free is not None
            assert in_free == (block.ref_cnt == 0), f"{block}: free-queue membership vs ref_cnt"
            if live_refs is not None:
                assert block.ref_cnt == live_refs.get(block.block_id, 0), (
                    f"{block}: ref_cnt {block.ref_cnt} != {live_refs.get(block.block_id, 0)}"
                )
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash
