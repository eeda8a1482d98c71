"""Radix prefix cache over token ids at block granularity (pure Python).

Every node is one full, computed KV block; its key is the block's token ids, and the path from the
root is the whole prefix. A separate root per LoRA adapter keeps adapters from sharing KV (base-model
rows share with each other under the `None` root). Blocks nobody references stay cached, in LRU
order, until the pool needs them. A request holds every block of its prefix path, so a node is never
less referenced than its children: freeing a request's blocks tail first puts children ahead of their
parents in the LRU, and eviction takes leaves first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from batchgen.cache.block_pool import BlockPool


class Node:
    __slots__ = ("key", "block", "parent", "children", "depth")

    def __init__(self, key: tuple[int, ...] | None, block: int, parent: "Node | None"):
        self.key = key
        self.block = block
        self.parent = parent
        self.depth = parent.depth + 1 if parent is not None else 0  # blocks from the root
        self.children: dict[tuple[int, ...], Node] = {}


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.roots: dict[Hashable, Node] = {}
        self.node_of_block: dict[int, Node] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first

    def root(self, adapter: Hashable) -> Node:
        if adapter not in self.roots:
            self.roots[adapter] = Node(None, -1, None)
        return self.roots[adapter]

    def match(self, adapter: Hashable, token_ids: list[int], max_blocks: int) -> list[Node]:
        """Longest cached path for token_ids, at most max_blocks full blocks."""
        node = self.roots.get(adapter)
        path: list[Node] = []
        bs = self.block_size
        while node is not None and len(path) < max_blocks:
            start = len(path) * bs
            node = node.children.get(tuple(token_ids[start:start + bs]))
            if node is not None:
                path.append(node)
        return path

    def insert(self, parent: Node, key: tuple[int, ...], block: int) -> Node:
        """Add a computed block under parent; if an equal block is cached already, return that node
        (the caller then swaps its copy for the cached one)."""
        node = parent.children.get(key)
        if node is None:
            node = Node(key, block, parent)
            parent.children[key] = node
            self.node_of_block[block] = node
        return node

    def is_cached(self, block: int) -> bool:
        return block in self.node_of_block

    def release(self, block: int) -> None:
        """A cached block lost its last user: it becomes evictable, most recently used."""
        self.evictable[block] = None

    def touch(self, block: int) -> None:
        """A cached, unreferenced block gains a user."""
        self.evictable.pop(block, None)

    def evict(self) -> int:
        """Drop the least recently used unreferenced block and return its id (now free)."""
        block, _ = self.evictable.popitem(last=False)
        node = self.node_of_block.pop(block)
        # Leaves go first by construction; a node with children left would orphan them, so drop the
        # whole subtree (its blocks are unreferenced too, as a child's user holds its parent).
        stack = list(node.children.values())
        while stack:
            child = stack.pop()
            stack.extend(child.children.values())
            del self.node_of_block[child.block]
            if child.block in self.evictable:
                del self.evictable[child.block]
                self.pool.give_back(child.block)
        del node.parent.children[node.key]
        return block

