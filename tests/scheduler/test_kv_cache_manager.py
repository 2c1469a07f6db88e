"""The KV cache manager alone: the four questions the scheduler asks it, and what they leave behind."""
from __future__ import annotations

from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.request import Request, SamplingLimits, Sequence
from pagedserve.v1 import scheduler_pb2 as pb

LIMITS = SamplingLimits(8, 0, frozenset(), frozenset(), False)


def sequence(seq_id: int, tokens: list[int]) -> Sequence:
    request = Request(f"r{seq_id}", list(tokens), pb.SamplingParams(), LIMITS, arrival=seq_id)
    return Sequence(seq_id, request, 0, list(tokens), len(tokens))


def admit(kv: KVCacheManager, seq: Sequence) -> list[int] | None:
    computed = kv.get_computed_blocks(seq)
    table = kv.allocate_slots(seq, seq.num_tokens - computed.num_tokens, computed)
    if table is not None:
        seq.num_computed = seq.num_tokens
        kv.cache_blocks(seq)
    return table


def test_a_shared_prefix_is_found_and_counted_once_per_admission():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first, second = sequence(0, list(range(1, 11))), sequence(1, list(range(1, 9)) + [50, 51])
    assert admit(kv, first) is not None
    computed = kv.get_computed_blocks(second)
    assert computed.num_tokens == 8 and computed.block_ids == kv.block_table(first)[:2]
    table = admit(kv, second)
    assert table[:2] == kv.block_table(first)[:2] and len(table) == 3
    assert (kv.queries, kv.hits) == (20, 8)
    assert kv.num_used_blocks == 4  # 3 + 3, two of them shared


def test_a_whole_prompt_in_cache_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, sequence(0, list(range(1, 9))))
    assert kv.get_computed_blocks(sequence(1, list(range(1, 9)))).num_tokens == 4


def test_allocation_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    holder = sequence(0, list(range(1, 13)))
    admit(kv, holder)  # 3 of 4 blocks
    big = sequence(1, list(range(20, 29)))
    before = (kv.num_used_blocks, kv.queries, list(kv.pool.free))
    assert kv.allocate_slots(big, 9, kv.get_computed_blocks(big)) is None
    assert (kv.num_used_blocks, kv.queries, list(kv.pool.free)) == before
    assert kv.block_table(big) == []


def test_revived_cached_blocks_count_against_the_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    old = sequence(0, list(range(1, 10)))
    admit(kv, old)
    kv.free(old)  # 3 free blocks, 2 of them cached
    again = sequence(1, list(range(1, 10)) + list(range(30, 35)))  # 2 cached + 2 new blocks = 4
    assert kv.allocate_slots(again, 6, kv.get_computed_blocks(again)) is None
    shorter = sequence(2, list(range(1, 10)))
    assert kv.allocate_slots(shorter, 1, kv.get_computed_blocks(shorter)) is not None
    assert kv.num_used_blocks == 3


def test_growing_appends_blocks_only_at_block_boundaries_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = sequence(0, [1, 2, 3])
    admit(kv, seq)
    for token in range(4, 10):
        seq.token_ids.append(token)
        new = kv.allocate_slots(seq, 1)
        assert len(new) == (1 if seq.num_computed % 4 == 0 else 0)
        seq.num_computed += 1
    assert len(kv.block_table(seq)) == 3
    kv.free(seq)
    assert kv.num_used_blocks == 0 and kv.block_table(seq) == []


def test_without_caching_nothing_is_found_or_registered():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    admit(kv, sequence(0, list(range(1, 10))))
    assert kv.get_computed_blocks(sequence(1, list(range(1, 10)))).num_tokens == 0
    assert not kv.pool.cached


def test_reset_resizes_and_keeps_the_counters():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    admit(kv, sequence(0, list(range(1, 10))))
    kv.reset(5)
    assert (kv.num_blocks, kv.num_used_blocks, kv.queries) == (5, 0, 9)


# ----- sliding window -----------------------------------------------------------------------------

def decode(kv: KVCacheManager, seq: Sequence, token: int) -> list[int] | None:
    """One decode step: `token` sampled (appended), then its blocks asked for and it computed."""
    seq.token_ids.append(token)
    blocks = kv.allocate_slots(seq, 1)
    seq.num_computed += 1
    kv.cache_blocks(seq)
    return blocks


def test_sliding_window_releases_the_blocks_behind_it():
    """Window 6, blocks of 4: before computing position p, blocks wholly before p - 5 go back; a
    long sequence holds at most the window's blocks plus the one being filled."""
    from pagedserve.scheduler.kv_cache_manager import NULL_BLOCK

    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=6, max_step_tokens=4)
    seq = sequence(0, list(range(1, 11)))  # 10 tokens: blocks 0-2
    assert len(admit(kv, seq)) == 3
    held = []
    for t in range(40):  # positions 10 .. 49
        decode(kv, seq, 100 + t)
        held.append(kv.num_used_blocks)
        table = kv.block_table(seq)
        first_key = seq.num_computed - 1 - 6 + 1  # the window of the position just computed
        assert all(b == NULL_BLOCK for b in table[: first_key // 4])
        assert NULL_BLOCK not in table[first_key // 4:]
    assert max(held) <= 3 and len(kv.block_table(seq)) == 13
    kv.free(seq)
    assert kv.num_used_blocks == 0 and kv.pool.num_free == 8


def test_a_prefix_hit_after_release_needs_only_the_window():
    """The first sequence's early blocks were released and then evicted by others; a sequence
    with the same 49-token prefix still hits its last 12 blocks' tail: the blocks of the 6
    positions before the hit's end, and NULL entries (block 0 for the workers) before them."""
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=6, max_step_tokens=4)
    first = sequence(0, list(range(1, 11)))
    admit(kv, first)
    for t in range(40):
        decode(kv, first, 100 + t)
    tokens = list(first.token_ids)  # 50 tokens, all computed
    kv.free(first)
    # Other sequences take the free blocks, evicting the oldest released ones (the first blocks).
    filler = sequence(1, [900 + i for i in range(16)])
    admit(kv, filler)
    kv.free(filler)

    again = sequence(2, tokens + [7])  # 51 tokens: at most 12 full blocks can hit
    hit = kv.get_computed_blocks(again)
    assert hit.num_tokens == 48 and hit.num_skipped == 10 and len(hit.block_ids) == 2
    # The hit's blocks hold positions 40 .. 47: the window of position 48 is 43 .. 48.
    table = kv.allocate_slots(again, again.num_tokens - hit.num_tokens, hit)
    assert table[:10] == [0] * 10 and table[10:12] == hit.block_ids and len(table) == 13
    assert kv.num_used_blocks == 3
    # Nothing of the window cached: no hit at all (a full-attention hit would need block 0 on).
    kv.free(again)
    for b in hit.block_ids:
        kv.pool.evict(b)
    assert kv.get_computed_blocks(sequence(3, tokens + [7])).num_tokens == 0


def test_sliding_window_bounds_what_a_request_needs():
    kv = KVCacheManager(num_blocks=8, block_size=4, sliding_window=6, max_step_tokens=4)
    assert kv.blocks_for(10) == 3
    assert kv.blocks_for(10_000) == 4  # positions p - 5 .. p + 3: 9 of them, over at most 4 blocks
