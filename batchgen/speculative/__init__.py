"""Speculative decoding proposers. Each one guesses up to `row.num_spec` tokens per decoding row;
the target model verifies them in one forward (batchgen/exec/rejection.py)."""

from __future__ import annotations

from typing import Protocol

from batchgen.sched.output import ScheduledRequest


class Proposer(Protocol):
    def propose(self, rows: list[ScheduledRequest]) -> tuple[list[list[int]], list]:
        """Per row: the proposed tokens, and the proposer's distributions over them
        ([len(proposal), vocab] tensor) or None when proposals are certain (one-hot, as n-gram's)."""

    def observe(self, rows: list[ScheduledRequest], proposals: list[list[int]]) -> None:
        """Called with every step's rows before the target runs them (a draft model keeps its KV
        cache in step with the target's)."""

    def forget(self, request_ids: list[str]) -> None:
        """Requests that finished."""
