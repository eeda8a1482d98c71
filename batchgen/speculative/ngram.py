"""Prompt lookup: propose what followed the most recent earlier occurrence of the text's suffix."""

from __future__ import annotations

from batchgen.sched.output import ScheduledRequest


def ngram_propose(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Match the last n tokens (n from n_max down to n_min) against earlier tokens and return up
    to k tokens that followed: the most recent match with k tokens after it, else the longest."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        first = suffix[0]
        best: list[int] = []
        for start in range(size - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == suffix:
                follow = tokens[start + n:start + n + k]
                if len(follow) == k:
                    return follow
                best = max(best, follow, key=len)
        if best:
            return best
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max

    def propose(self, rows: list[ScheduledRequest]) -> tuple[list[list[int]], list]:
        proposals = [ngram_propose(r.all_token_ids, r.num_spec, self.n_min, self.n_max) for r in rows]
        return proposals, [None] * len(rows)

    def observe(self, rows: list[ScheduledRequest], proposals: list[list[int]]) -> None:
        pass

    def forget(self, request_ids: list[str]) -> None:
        pass
