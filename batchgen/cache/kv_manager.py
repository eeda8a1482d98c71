"""KV cache manager: block tables of requests over the block pool and the radix prefix cache."""

from __future__ import annotations

from batchgen.cache.block_pool import BlockPool
from batchgen.cache.radix import Node, RadixCache
from batchgen.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.radix = RadixCache(self.pool, block_size) if enable_prefix_caching else None
        # request id -> last node of its path in the radix tree (root when none of its blocks is cached)
        self._tail: dict[str, Node] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.pool.free) + (len(self.radix.evictable) if self.radix else 0)

    def match_prefix(self, req: Request) -> list[Node]:
        """Cached blocks for the start of req's tokens; at least one token is left to compute, so the
        step that admits the request has a position to sample from."""
        if self.radix is None:
            return []
        return self.radix.match(req.lora, req.token_ids, (req.num_tokens - 1) // self.block_size)

    def allocate(self, req: Request, num_new_tokens: int, hits: list[Node] = ()) -> bool:
        """Give req blocks for num_computed_tokens (+ len(hits) cached blocks) + num_new_tokens tokens.
        Returns False, changing nothing, when the pool cannot supply them."""
        hit_tokens = len(hits) * self.block_size
        needed = cdiv(req.num_computed_tokens + hit_tokens + num_new_tokens, self.block_size)
        num_new_blocks = needed - len(req.block_ids) - len(hits)
        # Hits that nobody references yet are counted as free; taking them makes them unavailable.
        idle_hits = sum(1 for n in hits if self.pool.ref_cnt[n.block] == 0)
        if num_new_blocks > self.num_free_blocks - idle_hits:
            return False
        for node in hits:
            if self.pool.ref_cnt[node.block] == 0:
                self.radix.touch(node.block)
            self.pool.ref_cnt[node.block] += 1
            req.block_ids.append(node.block)
        if hits:
            self._tail[req.request_id] = hits[-1]
            req.num_computed_tokens += hit_tokens
        for _ in range(max(num_new_blocks, 0)):
            if not self.pool.free:
                self.pool.free.append(self.radix.evict())
            req.block_ids.append(self.pool.take_free())
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Enter req's full, computed blocks into the radix tree as soon as they are complete."""
        if self.radix is None:
            return
        tail = self._tail.get(req.request_id) or self.radix.root(req.lora)
        num_cached = tail.depth
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size  # verified tokens only
        bs = self.block_size
        for i in range(num_cached, num_full):
            block = req.block_ids[i]
            node = self.radix.insert(tail, tuple(req.token_ids[i * bs:(i + 1) * bs]), block)
            if node.block != block:
                # Another request computed the same block first: share its copy, free ours.
                if self.pool.ref_cnt[node.block] == 0:
                    self.radix.touch(node.block)
                self.pool.ref_cnt[node.block] += 1
                req.block_ids[i] = node.block
                self._release(block)
            tail = node
        self._tail[req.request_id] = tail

    def trim(self, req: Request) -> None:
        """Return blocks past the request's computed tokens (rejected speculative tokens' KV) to the pool."""
        keep = cdiv(req.num_computed_tokens, self.block_size)
        while len(req.block_ids) > keep:
            self._release(req.block_ids.pop())

    def free(self, req: Request) -> None:
        """Release all of req's blocks, tail first (so the LRU evicts leaves before their parents)."""
        for block in reversed(req.block_ids):
            self._release(block)
        req.block_ids = []
        self._tail.pop(req.request_id, None)

    def _release(self, block: int) -> None:
        self.pool.ref_cnt[block] -= 1
        if self.pool.ref_cnt[block] == 0:
            if self.radix is not None and self.radix.is_cached(block):
                self.radix.release(block)
            else:
                self.pool.give_back(block)
