"""The KV cache manager: the scheduler's one door to KV memory (vLLM v1's KVCacheManager).

The scheduler asks it four things and nothing else: how many leading tokens of a sequence are
cached already (get_computed_blocks), the blocks for a sequence's next n tokens if they fit
(allocate_slots), to offer the blocks a step filled to the prefix cache (cache_blocks), and to
free a sequence's blocks (free). Block tables, block hashes, ref counts and block arithmetic live
here and in the pool below; a sequence carries none of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool, block_hash
from .lora import lora_root
from .request import Sequence


@dataclass
class ComputedBlocks:
    """A sequence's leading blocks found in the prefix cache, and the tokens they hold."""

    block_ids: list[int]
    num_tokens: int


NO_BLOCKS = ComputedBlocks([], 0)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.tables: dict[int, list[int]] = {}       # seq_id -> physical block ids, logical order
        self.hashes: dict[int, list[bytes]] = {}      # seq_id -> hashes of its full blocks, in order
        self.num_registered: dict[int, int] = {}      # seq_id -> leading blocks offered to the cache
        self.queries = 0  # prompt tokens looked up in the prefix cache, at admissions
        self.hits = 0     # of those, tokens found

    # ----- figures ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by sequences; cached blocks that nobody holds count as free."""
        return self.pool.num_used

    def block_table(self, seq: Sequence) -> list[int]:
        """seq's physical blocks in logical order (token t lives in block t // block_size)."""
        return self.tables.get(seq.seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- the scheduler's questions ----------------------------------------------------------

    def get_computed_blocks(self, seq: Sequence, max_num_tokens: int | None = None) -> ComputedBlocks:
        """The cached blocks that hold a leading part of seq's tokens, at most max_num_tokens of
        them (a request that wants its prompt's logprobs must compute the positions it wants). At
        least one token is always left to compute, since the worker needs a position whose logits
        it samples from."""
        if not self.enable_caching:
            return NO_BLOCKS
        num_full = (seq.num_tokens - 1) // self.block_size
        if max_num_tokens is not None:
            num_full = min(num_full, max_num_tokens // self.block_size)
        hashes = self.full_block_hashes(seq, num_full)
        found = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            found.append(block)
        return ComputedBlocks(found, len(found) * self.block_size)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> list[int] | None:
        """Blocks for seq's next num_new_tokens, appended to its table; None (nothing changed)
        when too few blocks are free.

        `computed` admits a sequence that holds no blocks: its cached prefix joins the table
        first, and the answer is the whole table. Otherwise the answer is the blocks appended.
        """
        table = self.tables.get(seq.seq_id, ())
        if computed is None:
            # The tokens of steps still in flight (async scheduling) hold their slots already.
            needed = self.blocks_for(seq.num_computed + seq.num_scheduled + num_new_tokens) - len(table)
            if needed <= 0:
                return []  # most decode steps: the last block has room
            prefix = []
        else:
            prefix = computed.block_ids
            needed = self.blocks_for(computed.num_tokens + num_new_tokens) - len(table) - len(prefix)
        if needed > self.pool.num_free - self.pool.num_revivable(prefix):
            return None
        self.pool.touch(prefix)
        blocks = prefix + self.pool.get_new_blocks(max(needed, 0))
        self.tables.setdefault(seq.seq_id, []).extend(blocks)
        if computed is not None:
            self.queries += seq.num_tokens
            self.hits += computed.num_tokens
        return blocks

    def cache_blocks(self, seq: Sequence) -> None:
        """Offers the blocks seq has filled completely (seq.num_computed tokens) to the prefix
        cache, so later requests can share them."""
        if not self.enable_caching:
            return
        table = self.tables.get(seq.seq_id, [])
        num_full = min(seq.num_computed // self.block_size, len(table))
        done = self.num_registered.get(seq.seq_id, 0)
        if num_full <= done:
            return
        hashes = self.full_block_hashes(seq, num_full)
        for i in range(done, num_full):
            self.pool.cache_block(table[i], hashes[i])
        self.num_registered[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Returns seq's blocks (finished, aborted or preempted); cached ones stay revivable."""
        self.pool.free_blocks(self.tables.pop(seq.seq_id, []))
        self.hashes.pop(seq.seq_id, None)
        self.num_registered.pop(seq.seq_id, None)

    def reset(self, num_blocks: int | None = None) -> None:
        """Forgets every block: the workers' caches were lost, or now hold num_blocks blocks.
        The query and hit counters stay, since they feed monotonic metrics."""
        self.pool = BlockPool(self.num_blocks if num_blocks is None else num_blocks)
        self.tables.clear()
        self.hashes.clear()
        self.num_registered.clear()

    # ----- hashes -----------------------------------------------------------------------------

    def full_block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Hashes of seq's first num_full_blocks blocks, extending the ones computed before."""
        hashes = self.hashes.setdefault(seq.seq_id, [])
        parent = hashes[-1] if hashes else lora_root(seq)  # an adapter's blocks never match another's
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            hashes.append(parent)
        return hashes[:num_full_blocks]
