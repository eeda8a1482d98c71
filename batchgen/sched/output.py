"""What the scheduler tells the model runner, and what the runner answers: plain data only."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from batchgen.sampling import SamplingParams


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # their first position (= num_computed_tokens before the step)
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the chunk reaches the last known token: sample the next one
    params: SamplingParams
    seed: int | None
    num_output_tokens: int  # generated so far (min_tokens suppresses stop ids until reached)
    stop_ids: frozenset[int] = frozenset()
    # Speculative decoding: up to num_spec proposed tokens may follow token_ids (slots are reserved);
    # the proposer reads the row's verified tokens (a reference to the request's list, not a copy).
    num_spec: int = 0
    all_token_ids: list[int] | None = None
    lora_slot: int = -1  # device slot of the row's LoRA adapter; -1: base model
    forced_token: int | None = None  # thinking_token_budget spent: this step yields this token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # rows with one token first, then multi-token chunks
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step
    # LoRA (slot, adapter name) assignments to load before this step's forward (rows above use them)
    lora_loads: list[tuple[int, str]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass
class ModelOutput:
    # One entry per scheduled request with sample=True, in the scheduled order.
    token_ids: list[int]  # the newly sampled token (after any accepted proposals)
    logprobs: list[dict[int, float] | None]
    accepted: list[list[int]] | None = None  # proposals the target accepted, per row; None: no speculation
    num_proposed: list[int] | None = None  # proposals verified, per row
    # prompt_logprobs: request id -> (index of the first prompt token scored, [{token id: logprob}])
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] | None = None


def shared_prefix_groups(block_ids: list[list[int]], ctx_lens: list[int], block_size: int, min_rows: int = 2,
                         min_blocks: int = 4) -> tuple[list[int], list[int], list[int]]:
    """Groups of one-token rows whose block tables begin with the same blocks (the radix cache
    gives rows with a common cached prefix the same block ids), for cascade attention.

    Row i may share at most (ctx_lens[i] - 1) // block_size blocks (its own pass keeps its last
    token). Rows sorted by their tables put common prefixes side by side; a run of neighbours
    sharing >= min_blocks blocks, at least min_rows long, is a group sharing the run's shortest
    common prefix. Returns plain lists (group_rows, group_starts, group_blocks): group g is rows
    group_rows[group_starts[g]:group_starts[g+1]] sharing group_blocks[g] leading blocks."""
    tables = {i: ids[:(ctx - 1) // block_size] for i, (ids, ctx) in enumerate(zip(block_ids, ctx_lens))
              if (ctx - 1) // block_size >= min_blocks}
    order = sorted(tables, key=tables.__getitem__)
    rows: list[int] = []
    starts, blocks = [0], []
    run, shared = order[:1], 0

    def close():
        if len(run) >= min_rows:
            rows.extend(run)
            starts.append(len(rows))
            blocks.append(shared)

    for prev, i in zip(order, order[1:]):
        common = len(os.path.commonprefix([tables[prev], tables[i]]))
        if common >= min_blocks:
            shared = common if len(run) == 1 else min(shared, common)
            run.append(i)
        else:
            close()
            run, shared = [i], 0
    if order:
        close()
    return rows, starts, blocks
