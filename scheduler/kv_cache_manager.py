"""The KV cache manager: the scheduler's one door to KV memory (vLLM v1's KVCacheManager).

The scheduler asks it four things and nothing else: how many leading tokens of a sequence are
cached already (get_computed_blocks), the blocks for a sequence's next n tokens if they fit
(allocate_slots), to offer the blocks a step filled to the prefix cache (cache_blocks), and to
free a sequence's blocks (free). Block tables, block hashes, ref counts and block arithmetic live
here and in the pool below; a sequence carries none of them.

Sliding window (`sliding_window`, set when every layer of the model attends within it; vLLM's
SlidingWindowManager is the model): a query at position p sees keys p - window + 1 .. p, so before
each step the blocks wholly behind the window of the step's first query are released (their table
entries become NULL_BLOCK) and a long sequence holds a bounded number of blocks. A prefix-cache hit
then needs only the blocks of the window before its end, not the whole prefix; the entries before
them are NULL_BLOCK too. The workers are sent block 0 for such entries: their kernels never read
a position behind the window, so any valid id does.
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
    num_skipped: int = 0  # leading blocks behind the window (sliding window): not held, NULL_BLOCK


NO_BLOCKS = ComputedBlocks([], 0)
NULL_BLOCK = -1  # a table entry whose block was released (behind the sliding window)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 sliding_window: int | None = None, max_step_tokens: int | None = None):
        """sliding_window: the window every layer attends within (None: blocks are kept until
        free); max_step_tokens: the most tokens a sequence computes in one step (the scheduler's
        token budget), which bounds the blocks a sliding sequence holds at once."""
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.max_step_tokens = max_step_tokens
        self.pool = BlockPool(num_blocks)
        self.tables: dict[int, list[int]] = {}       # seq_id -> physical block ids, logical order
        self.hashes: dict[int, list[bytes]] = {}      # seq_id -> hashes of its full blocks, in order
        self.num_registered: dict[int, int] = {}      # seq_id -> leading blocks offered to the cache
        self.num_released: dict[int, int] = {}        # seq_id -> leading entries that are NULL_BLOCK
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
        """seq's physical blocks in logical order (token t lives in block t // block_size);
        NULL_BLOCK for those released behind the sliding window."""
        return self.tables.get(seq.seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once: all of them, or with a
        sliding window those of a step's tokens and the window before them (the positions
        [first - window + 1, first + max_step_tokens) may straddle one more block boundary)."""
        blocks = self._blocks_upto(num_tokens)
        if self.sliding_window and self.max_step_tokens:
            blocks = min(blocks, self._blocks_upto(self.sliding_window - 1 + self.max_step_tokens) + 1)
        return blocks

    def _blocks_upto(self, num_tokens: int) -> int:
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
        if self.sliding_window:
            return self._window_hit(hashes)
        found = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            found.append(block)
        return ComputedBlocks(found, len(found) * self.block_size)

    def _window_hit(self, hashes: list[bytes]) -> ComputedBlocks:
        """The longest hit of n leading blocks whose window is cached: the blocks that hold
        positions n * block_size - window + 1 .. n * block_size - 1, the keys the first computed
        token sees (the blocks before them need not be cached: vLLM's sliding-window hit)."""
        bs, best, run_start = self.block_size, None, 0
        blocks = [self.pool.get_cached_block(h) for h in hashes]
        for i, block in enumerate(blocks):
            if block is None:
                run_start = i + 1
                continue
            first_needed = max(0, (i + 1) * bs - self.sliding_window + 1) // bs
            if run_start <= first_needed:
                best = (first_needed, i + 1)
        if best is None:
            return NO_BLOCKS
        first, end = best
        return ComputedBlocks(blocks[first:end], end * bs, num_skipped=first)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> list[int] | None:
        """Blocks for seq's next num_new_tokens, appended to its table; None (nothing allocated)
        when too few blocks are free. With a sliding window, the blocks the step no longer needs
        are released first.

        `computed` admits a sequence that holds no blocks: its cached prefix joins the table
        first, and the answer is the whole table. Otherwise the answer is the blocks appended.
        """
        table = self.tables.get(seq.seq_id, ())
        skipped = 0
        if computed is None:
            # The tokens of steps still in flight (async scheduling) hold their slots already.
            first_new = seq.num_computed + seq.num_scheduled
            self.release_behind_window(seq, first_new)
            needed = self._blocks_upto(first_new + num_new_tokens) - len(table)
            if needed <= 0:
                return []  # most decode steps: the last block has room
            prefix = []
        else:
            prefix, skipped = computed.block_ids, computed.num_skipped
            needed = self._blocks_upto(computed.num_tokens + num_new_tokens) - len(table) - skipped - len(prefix)
        if needed > self.pool.num_free - self.pool.num_revivable(prefix):
            return None
        self.pool.touch(prefix)
        blocks = prefix + self.pool.get_new_blocks(max(needed, 0))
        self.tables.setdefault(seq.seq_id, []).extend([NULL_BLOCK] * skipped + blocks)
        if computed is not None:
            self.queries += seq.num_tokens
            self.hits += computed.num_tokens
            self.num_released[seq.seq_id] = skipped
            return [0] * skipped + blocks  # the workers' tables need an id there: one never read
        return blocks

    def release_behind_window(self, seq: Sequence, first_new: int) -> None:
        """Returns the blocks wholly before the window of position first_new, the first token the
        next step computes (every later query sees less far back). Steps already sent read them
        before any step that reuses them writes there: workers run steps in order."""
        if not self.sliding_window:
            return
        keep_from = max(0, first_new - self.sliding_window + 1) // self.block_size
        table = self.tables.get(seq.seq_id)
        done = self.num_released.get(seq.seq_id, 0)
        if table is None or keep_from <= done:
            return
        self.pool.free_blocks(table[done:keep_from])
        table[done:keep_from] = [NULL_BLOCK] * (keep_from - done)
        self.num_released[seq.seq_id] = keep_from

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
        # Blocks released before they were offered (a window shorter than a step) are gone.
        for i in range(max(done, self.num_released.get(seq.seq_id, 0)), num_full):
            self.pool.cache_block(table[i], hashes[i])
        self.num_registered[seq.seq_id] = num_full

    def free(self, seq: Sequence) -> None:
        """Returns seq's blocks (finished, aborted or preempted); cached ones stay revivable."""
        table = self.tables.pop(seq.seq_id, [])
        self.pool.free_blocks(table[self.num_released.pop(seq.seq_id, 0):])
        self.hashes.pop(seq.seq_id, None)
        self.num_registered.pop(seq.seq_id, None)

    def reset(self, num_blocks: int | None = None) -> None:
        """Forgets every block: the workers' caches were lost, or now hold num_blocks blocks.
        The query and hit counters stay, since they feed monotonic metrics."""
        self.pool = BlockPool(self.num_blocks if num_blocks is None else num_blocks)
        self.tables.clear()
        self.hashes.clear()
        self.num_registered.clear()
        self.num_released.clear()

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
