"""Per-request block tables over the shared BlockPool: prefix-cache lookups, allocation, COW, free.

Ask, then commit: ``find_cached_prefix`` and ``can_allocate`` have no side effects; ``allocate``
does the work and returns False (touching nothing) when the pool is too small, which is normal
back-pressure for the scheduler, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.block_pool import BlockPool, KVBlock
from splitserve.engine.request import Request


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks a request may start from, and how many tokens they cover."""

    blocks: tuple[KVBlock, ...]

    def num_tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size


NO_HIT = PrefixHit(())


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.tables: dict[str, list[KVBlock]] = {}
        # Blocks kept alive after their request ended, e.g. a prefill's prompt KV held under a
        # lease until a decode pod has read it. Keyed by the holder's id.
        self.held: dict[str, list[KVBlock]] = {}
        # Copy-on-write copies (src block id, dst block id) the runner must do before the next
        # forward pass. Drained by the scheduler into each step's output.
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found

    # --- queries (no side effects) ---------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> PrefixHit:
        """Longest run of cached full blocks matching the request's tokens from the start.

        At least one token is always left to compute: the model must produce logits for the last
        one. A request asking for prompt logprobs gets no hit: every prompt position needs its
        logits (as in vLLM). Mutates nothing.
        """
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        bs = self.block_size
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.lookup(block_hash, request.all_token_ids[i * bs : (i + 1) * bs])
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(tuple(blocks))

    def num_blocks_needed(self, request: Request, num_new_tokens: int, hit: PrefixHit) -> int:
        """Free blocks that ``allocate(request, num_new_tokens, hit)`` would consume."""
        table = self.tables.get(request.request_id)
        if table is None:
            total = hit.num_tokens(self.block_size) + num_new_tokens
            revived = sum(1 for b in hit.blocks if b.ref_cnt == 0)  # leave the free queue
            return max(-(-total // self.block_size) - len(hit.blocks), 0) + revived
        total = request.num_computed_tokens + num_new_tokens
        need = max(-(-total // self.block_size) - len(table), 0)
        return need + (1 if self._shared_write_block(request, table) is not None else 0)

    def can_allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        need = self.num_blocks_needed(request, num_new_tokens, hit)
        return need <= self.pool.num_free_blocks

    # --- commands ------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``request``; False if the pool can't.

        On the first allocation ``hit`` (from ``find_cached_prefix``) is adopted and the request's
        ``num_computed_tokens`` / ``num_cached_tokens`` are set from it.
        """
        if not self.can_allocate(request, num_new_tokens, hit):
            return False
        table = self.tables.get(request.request_id)
        if table is None:
            table = self.tables[request.request_id] = []
            self.pool.touch(hit.blocks)
            table.extend(hit.blocks)
            cached = hit.num_tokens(self.block_size)
            request.num_computed_tokens = cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = cached
                self.prefix_queries += request.num_prompt_tokens
                self.prefix_hits += cached
        elif (idx := self._shared_write_block(request, table)) is not None:
            self._copy_on_write(table, idx)
        total = request.num_computed_tokens + num_new_tokens
        missing = -(-total // self.block_size) - len(table)
        if missing > 0:
            table.extend(self.pool.allocate(missing))
        return True

    def _shared_write_block(self, request: Request, table: list[KVBlock]) -> int | None:
        """Index of the partially filled block the next token goes into, if others share it.

        Full blocks are immutable, so only this block can need a private copy (after a fork).
        """
        pos = request.num_computed_tokens
        idx = pos // self.block_size
        if pos % self.block_size == 0 or idx >= len(table) or table[idx].ref_cnt <= 1:
            return None
        return idx

    def _copy_on_write(self, table: list[KVBlock], idx: int) -> None:
        (fresh,) = self.pool.allocate(1)
        self.pending_copies.append((table[idx].block_id, fresh.block_id))
        self.pool.free([table[idx]])
        table[idx] = fresh

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.tables.get(request.request_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        bs = self.block_size
        for i in range(num_full):
            block = table[i]
            if block.block_hash is None:
                parent = request.block_hashes[i - 1] if i else None
                tokens = request.all_token_ids[i * bs : (i + 1) * bs]
                self.pool.cache(block, request.block_hashes[i], parent, tokens)

    def trim(self, request: Request) -> int:
        """Free the request's blocks past its computed tokens (those only rejected draft tokens
        wrote to); returns how many. They were allocated fresh in the step that wrote them, so
        none is shared or cached."""
        table = self.tables.get(request.request_id)
        keep = -(-request.num_computed_tokens // self.block_size)
        if not table or len(table) <= keep:
            return 0
        extra = table[keep:]
        del table[keep:]
        self.pool.free(reversed(extra))
        return len(extra)

    def fork(self, parent: Request, child: Request) -> None:
        """Share every block of ``parent`` with ``child`` (copy-on-write on the partial tail)."""
        table = list(self.tables[parent.request_id])
        self.pool.touch(table)
        self.tables[child.request_id] = table

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first); safe to call twice."""
        table = self.tables.pop(request.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def hold(self, request: Request, key: str) -> list[int]:
        """Detach the request's blocks into ``held[key]`` (refs kept) and return their ids."""
        table = self.tables.pop(request.request_id, [])
        if key in self.held:
            raise ValueError(f"blocks are already held under {key!r}")
        self.held[key] = table
        return [b.block_id for b in table]

    def release_held(self, key: str) -> int:
        """Free blocks held under ``key``; returns how many (0 if unknown: safe to repeat)."""
        table = self.held.pop(key, None)
        if not table:
            return 0
        self.pool.free(reversed(table))
        return len(table)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, ())]

    def num_accounted_blocks(self) -> int:
        """Distinct blocks some table or hold refers to (cheap: a pass over the tables)."""
        ids: set[int] = set()
        for table in (*self.tables.values(), *self.held.values()):
            ids.update(b.block_id for b in table)
        return len(ids)

    def check_integrity(self) -> None:
        refs: dict[int, int] = {}
        for table in [*self.tables.values(), *self.held.values()]:
            for block in table:
                refs[block.block_id] = refs.get(block.block_id, 0) + 1
        self.pool.check_integrity(refs)
