"""The KV block pool: reference-counted blocks, a prefix cache keyed by block hashes, LRU eviction.

A full block is identified by the hash of (its parent block's hash, its token ids), so a hash names
a whole prefix, not just 16 tokens. Blocks nobody references sit in the free queue in LRU order;
those that still carry a hash can be revived by a later request until they are evicted, which
happens only when a block is needed and the queue's oldest entry is taken.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .request import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A collision-resistant key: requests of different users must never share KV by accident."""
    return hashlib.blake2b(parent + array("i", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Block ids with ref count 0, oldest first. Every free block is here, cached or not.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0     # of those, tokens found

    # ----- accounting -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prefix cache -----------------------------------------------------------------------

    def hashes_of(self, token_ids: list[int], num_full_blocks: int, known: list[bytes]) -> list[bytes]:
        """Hashes of the first num_full_blocks blocks of token_ids, extending those already known."""
        hashes = list(known[:num_full_blocks])
        parent = hashes[-1] if hashes else b""
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
        return hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold a leading part of seq's tokens. At least one token is always
        left to compute, since the worker needs a position whose logits it samples from."""
        if not self.enable_caching:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        seq.block_hashes = self.hashes_of(seq.token_ids, num_full, seq.block_hashes)
        found = []
        for h in seq.block_hashes[:num_full]:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_tokens
        self.hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks that seq has filled completely, so later requests can share them."""
        if not self.enable_caching:
            return
        num_full = min(seq.num_computed // self.block_size, len(seq.block_ids))
        if num_full <= seq.num_registered:
            return
        seq.block_hashes = self.hashes_of(seq.token_ids, num_full, seq.block_hashes)
        for i in range(seq.num_registered, num_full):
            block, h = seq.block_ids[i], seq.block_hashes[i]
            if self.hash_of[block] is None and h not in self.cached:
                self.hash_of[block] = h
                self.cached[h] = block
        seq.num_registered = num_full

    # ----- allocation -------------------------------------------------------------------------

    def take(self, blocks: list[int]) -> None:
        """Adds a reference to each block (cached blocks found for a new sequence)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks, evicting the least recently freed cached blocks; None if too few."""
        if n > len(self.free):
            return None
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

    def release(self, blocks: list[int]) -> None:
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

    def reset(self) -> None:
        """Forgets every block: the workers' caches were lost (a worker restarted). The counters
        stay, since they feed monotonic metrics."""
        queries, hits = self.queries, self.hits
        self.__init__(self.num_blocks, self.block_size, self.enable_caching)
        self.queries, self.hits = queries, hits
