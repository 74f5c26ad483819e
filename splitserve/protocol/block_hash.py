"""Prefix-cache block hashes: the ONE definition shared by the engine and the router.

A full block of ``block_size`` token ids is identified by a chained hash

    h_i = H(h_{i-1}, tokens of block i, extra keys)

so equal hashes imply equal prefixes (up to a 64-bit collision, which the engine guards against by
comparing token ids on a hit). The hash must be reproducible across processes and machines, so it is
built from a fixed byte encoding with BLAKE2b, never from Python's randomised ``hash()``.
Only full blocks are hashed: a partial tail block can still grow and is never shared by hash.

This module has no heavy imports: the router imports it without torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# The root of every chain; bump it to invalidate all hashes if the encoding ever changes.
HASH_VERSION = 1
_ROOT = int.from_bytes(
    hashlib.blake2b(b"splitserve-block-hash-v%d" % HASH_VERSION, digest_size=8).digest(), "little"
)


def hash_block_tokens(
    parent_hash: int | None, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> int:
    """Hash one full block given its parent's hash (None for the first block).

    Returns an unsigned 64-bit integer (fits a protobuf ``fixed64``).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<Q", _ROOT if parent_hash is None else parent_hash))
    h.update(struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids))
    for key in extra_keys:
        encoded = key.encode()
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
    return int.from_bytes(h.digest(), "little")


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[str] = (),
    parent_hash: int | None = None,
) -> list[int]:
    """Chained hashes of each full block in ``token_ids`` (a trailing partial block is skipped)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    hashes: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes
