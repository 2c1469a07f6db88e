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
