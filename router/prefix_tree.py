"""An approximate radix tree of the token prefixes the router sent one replica, for cache-aware
routing (router/routing.py): how much of a new prompt that replica has probably still cached.

Approximate because the router never hears what the scheduler evicts: the tree holds what was
sent, and forgets the least recently used leaves once it holds more than `max_tokens` tokens (a
stand-in for the replica's KV cache size). SGLang's router keeps such a tree (one for all its
workers, over characters); this one is per replica and over token ids, the unit the scheduler's
prefix cache matches.
"""
from __future__ import annotations

import heapq
import itertools


class Node:
    __slots__ = ("edge", "children", "parent", "last_used")

    def __init__(self, edge: tuple[int, ...], parent: "Node | None", last_used: int):
        self.edge = edge                      # the tokens from the parent to this node
        self.children: dict[int, Node] = {}   # by the first token of the child's edge
        self.parent = parent
        self.last_used = last_used            # the tree's clock when a prompt last passed here


def common_length(a: tuple[int, ...], b, start: int) -> int:
    """How many leading tokens of a equal b[start:]."""
    n = min(len(a), len(b) - start)
    for i in range(n):
        if a[i] != b[start + i]:
            return i
    return n


class PrefixTree:
    def __init__(self, max_tokens: int):
        """max_tokens: the most tokens the tree holds after an insert (older leaves go first)."""
        self.root = Node((), None, 0)
        self.max_tokens = max_tokens
        self.size = 0                         # tokens held, over every edge
        self._clock = itertools.count(1)

    def match(self, tokens) -> int:
        """The length of the longest prefix of `tokens` (a sequence of ids) in the tree. Marks
        nothing as used: routing asks every replica's tree, and only the chosen one's counts."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = common_length(child.edge, tokens, i)
            i += n
            if n < len(child.edge):
                break
            node = child
        return i

    def insert(self, tokens) -> int:
        """Adds `tokens` (a prompt sent to this replica), marks its path used, then evicts least
        recently used leaves beyond max_tokens. Returns the length that was already there."""
        now = next(self._clock)
        node, i = self.root, 0
        node.last_used = now
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = Node(tuple(tokens[i:]), node, now)
                node.children[tokens[i]] = leaf
                self.size += len(leaf.edge)
                break
            n = common_length(child.edge, tokens, i)
            if n < len(child.edge):
                child = self._split(child, n)
            child.last_used = now
            node, i = child, i + n
        matched = i
        self.evict()
        return matched

    def _split(self, child: Node, n: int) -> Node:
        """Cuts child's edge after n tokens; returns the new node holding the first n."""
        parent = child.parent
        middle = Node(child.edge[:n], parent, child.last_used)
        parent.children[child.edge[0]] = middle
        child.edge = child.edge[n:]
        child.parent = middle
        middle.children[child.edge[0]] = child
        return middle

    def evict(self) -> None:
        """Removes least recently used leaves until at most max_tokens tokens remain."""
        if self.size <= self.max_tokens:
            return
        heap = [(leaf.last_used, id(leaf), leaf) for leaf in self.leaves()]
        heapq.heapify(heap)
        while self.size > self.max_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.size -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))

    def leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                yield node
