"""The KV block pool: reference-counted blocks, a prefix cache keyed by block hashes, LRU eviction.

A full block is identified by the hash of (its parent block's hash, its token ids), so a hash names
a whole prefix, not just 16 tokens. Blocks nobody references sit in the free queue in LRU order;
those that still carry a hash can be revived by a later request until they are evicted, which
happens only when a block is needed and the queue's oldest entry is taken.

Only the KV cache manager (kv_cache_manager.py) uses the pool: it knows sequences, the pool knows
block ids and hashes.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A collision-resistant key: requests of different users must never share KV by accident."""
    return hashlib.blake2b(parent + array("i", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Block ids with ref count 0, oldest first. Every free block is here, cached or not.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def num_revivable(self, blocks: list[int]) -> int:
        """How many of these cached blocks sit in the free queue (touching them takes them out)."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    # ----- prefix cache -----------------------------------------------------------------------

    def get_cached_block(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def cache_block(self, block: int, h: bytes) -> None:
        """Offers a full block to the prefix cache under its hash; the first block of a hash wins."""
        if self.hash_of[block] is None and h not in self.cached:
            self.hash_of[block] = h
            self.cached[h] = block

    # ----- allocation -------------------------------------------------------------------------

    def touch(self, blocks: list[int]) -> None:
        """Adds a reference to each block (cached blocks found for a new sequence)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1

    def get_new_blocks(self, n: int) -> list[int]:
        """n fresh blocks, evicting the least recently freed cached blocks.

        Raises:
            ValueError: fewer than n blocks are free (callers check num_free first).
        """
        if n > len(self.free):
            raise ValueError(f"{n} blocks wanted, {len(self.free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            self.evict(b)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def evict(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            self.hash_of[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]

    def free_blocks(self, blocks: list[int]) -> None:
        """Drops one reference from each block. The tail goes to the free queue first, so a
        sequence's last blocks, the least likely to be shared, are evicted before its first ones."""
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.hash_of[b] is None:
                    # Uncached blocks are worth nothing: reuse them before any cached one.
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)
                else:
                    self.free[b] = None
