"""Block pool: reference counts and the free list of KV blocks (pure Python)."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out KV block ids. A block is free (in `free`), in use (ref_cnt > 0), or cached with no
    user (ref_cnt == 0, owned by the radix cache, which gives it back on eviction)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    def take_free(self) -> int:
        block = self.free.popleft()
        self.ref_cnt[block] = 1
        return block

    def give_back(self, block: int) -> None:
        """A block whose content is worth nothing goes back to the free list."""
        self.ref_cnt[block] = 0
        self.free.append(block)
