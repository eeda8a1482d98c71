"""Benchmark workloads: token-id prompts with per-row output lengths (greedy, ignore_eos)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    description: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def optimal_hit_rate(self, block_size: int = 16) -> float:
        """The best prefix-cache hit rate any order could reach: every row reuses the longest
        full-block prefix it shares with any other row, except the first row of each prefix."""
        seen: dict[tuple[int, ...], None] = {}
        cached = 0
        for p in sorted(self.prompts):
            best = 0
            for k in range(1, (len(p) - 1) // block_size + 1):
                if tuple(p[:k * block_size]) in seen:
                    best = k * block_size
                else:
                    break
            cached += best
            for k in range(1, len(p) // block_size + 1):
                seen[tuple(p[:k * block_size])] = None
        return cached / self.input_tokens


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def w1_fixed(rows: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    return Workload("W1", "fixed lengths: input 128, output 128", [_tokens(rng, 128) for _ in range(rows)],
                    [128] * rows)


def w2_variable(rows: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    prompts = [_tokens(rng, rng.randint(16, 512)) for _ in range(rows)]
    return Workload("W2", "variable lengths: input 16..512, output 16..256", prompts,
                    [rng.randint(16, 256) for _ in range(rows)])


def w3_shared_prefix(rows: int, num_prefixes: int = 4, prefix_len: int = 384, seed: int = 2) -> Workload:
    """A few long system prompts times many short questions, shuffled (as a dataset would come)."""
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len) for _ in range(num_prefixes)]
    prompts = [prefixes[i % num_prefixes] + _tokens(rng, rng.randint(8, 48)) for i in range(rows)]
    rng.shuffle(prompts)
    return Workload("W3", f"shared prefixes: {num_prefixes} x {prefix_len}-token system prompts, "
                          "8..48-token questions, output 64", prompts, [64] * rows)


def all_workloads(quick: bool) -> list[Workload]:
    if quick:
        return [w1_fixed(8), w2_variable(8), w3_shared_prefix(8)]
    return [w1_fixed(128), w2_variable(128), w3_shared_prefix(128)]
