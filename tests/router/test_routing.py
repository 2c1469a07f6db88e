"""The routing policies (router/routing.py) and the prefix tree of cache-aware routing
(router/prefix_tree.py), on plain objects: no processes."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from pagedserve.router.prefix_tree import PrefixTree
from pagedserve.router.routing import CacheAware, LeastLoad, Route, make_policy


@dataclass
class R:
    address: str
    load: int = 0


def brute_match(sent: list[list[int]], tokens: list[int]) -> int:
    best = 0
    for s in sent:
        n = 0
        while n < min(len(s), len(tokens)) and s[n] == tokens[n]:
            n += 1
        best = max(best, n)
    return best


def test_prefix_tree_matches_the_longest_prefix_sent_like_a_brute_force_search():
    rng = random.Random(0)
    tree, sent = PrefixTree(max_tokens=10**9), []
    for _ in range(300):
        base = rng.choice(sent) if sent and rng.random() < 0.7 else []
        tokens = base[:rng.randint(0, len(base))] + [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        probe = tokens[:rng.randint(0, len(tokens))] + [rng.randrange(4)]
        assert tree.match(probe) == brute_match(sent, probe)
        assert tree.insert(tokens) == brute_match(sent, tokens)
        sent.append(tokens)
    # size is the tokens held: every distinct prefix once.
    assert tree.size == len({tuple(s[:i]) for s in sent for i in range(1, len(s) + 1)})


def test_prefix_tree_evicts_least_recently_used_leaves_beyond_its_cap():
    tree = PrefixTree(max_tokens=12)
    system = [1, 2, 3, 4]
    tree.insert(system + [10, 11, 12, 13])        # a: 8 tokens
    tree.insert(system + [20, 21, 22, 23])        # b: 4 more: 12
    tree.insert(system + [10, 11, 12, 13, 14])    # a used again (and 1 more: 13 > 12)
    # b's branch is the least recently used leaf: it goes, a's stays whole.
    assert tree.size == 9
    assert tree.match(system + [10, 11, 12, 13, 14]) == 9
    assert tree.match(system + [20, 21, 22, 23]) == 4
    tree.insert(list(range(100, 120)))            # 20 tokens alone exceed the cap
    assert tree.size <= 12


def test_round_robin_takes_turns():
    policy, replicas = make_policy("round_robin"), [R("a"), R("b"), R("c")]
    picks = [policy.choose(replicas, Route([1])).address for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_the_idlest_and_shares_ties():
    policy = LeastLoad()
    assert policy.choose([R("a", 5), R("b", 2), R("c", 9)], Route([1])).address == "b"
    idle = [R("a"), R("b")]
    assert Counter(policy.choose(idle, Route([1])).address for _ in range(10)) == {"a": 5, "b": 5}


def test_session_sticks_to_one_replica_and_moves_only_a_leavers_sessions():
    policy = make_policy("session")
    three = [R("a:1"), R("b:1"), R("c:1")]
    sessions = [f"user-{i}" for i in range(300)]
    placed = {s: policy.choose(three, Route([1], s)).address for s in sessions}
    assert all(policy.choose(three, Route([9], s)).address == placed[s] for s in sessions)
    assert min(Counter(placed.values()).values()) > 50  # an even share each, roughly
    two = [r for r in three if r.address != "c:1"]
    moved = [s for s in sessions if policy.choose(two, Route([1], s)).address != placed[s]]
    assert set(moved) == {s for s in sessions if placed[s] == "c:1"}
    # Without the header: least load.
    assert policy.choose([R("a:1", 3), R("b:1", 1)], Route([1])).address == "b:1"


def route_all(policy, replicas, prompts):
    out = []
    for tokens in prompts:
        replica = policy.choose(replicas, Route(tokens))
        policy.routed(replica, Route(tokens))
        out.append(replica.address)
    return out


def test_cache_aware_sends_a_prompt_where_its_prefix_was_sent():
    policy, replicas = CacheAware(cache_threshold=0.5), [R("a"), R("b")]
    first = [list(range(100, 120)), list(range(200, 220))]
    a, b = route_all(policy, replicas, first)
    assert a != b  # nothing cached anywhere: the smaller tree, so they spread
    follow_ups = [first[1] + [7, 8], first[0] + [5, 6, 7], first[1] + [9]]
    assert route_all(policy, replicas, follow_ups) == [b, a, b]


def test_cache_aware_spreads_when_the_match_is_below_the_threshold():
    policy, replicas = CacheAware(cache_threshold=0.8), [R("a"), R("b")]
    first = route_all(policy, replicas, [list(range(10))])[0]
    # Half the prompt matches a's tree, below 0.8: the other (empty) replica gets it.
    assert route_all(policy, replicas, [list(range(5)) + list(range(50, 55))]) != [first]


@pytest.mark.parametrize("loads, imbalanced", [((40, 5), True), ((40, 30), False),
                                               ((10, 0), False)])
def test_cache_aware_gives_way_to_the_idlest_when_load_is_out_of_balance(loads, imbalanced):
    policy = CacheAware(cache_threshold=0.5, balance_abs_threshold=32, balance_rel_threshold=1.5)
    busy, idle = R("busy"), R("idle")
    prompt = list(range(30))
    policy.routed(busy, Route(prompt))  # busy holds the prefix
    busy.load, idle.load = loads
    chosen = policy.choose([busy, idle], Route(prompt + [1])).address
    assert chosen == ("idle" if imbalanced else "busy")


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="'fastest'"):
        make_policy("fastest")
