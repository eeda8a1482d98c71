"""Ranks > 0: build the same engine (their shards), then run each step's forward as rank 0 says.

Rank 0's runner sends, before its forward, the step as plain data: the rows in forward order
(ScheduledRequest, proposals already appended), the LoRA slot loads, and how many proposed tokens
each row carries (they fix which positions reach the LM head). A rank > 0 repeats exactly that
forward and the LM head's gather (collectives must match), and samples nothing: the scheduler and
the sampler live on rank 0 alone.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import torch

from batchgen.distributed.group import TensorParallelError, TPGroup, worker_group
from batchgen.sched.output import ScheduledRequest, SchedulerOutput

logger = logging.getLogger("batchgen")


class StepSender:
    """Rank 0's side, called by ModelRunner.execute before each forward."""

    def __init__(self, group: TPGroup):
        self.group = group

    def send_step(self, batch: list[ScheduledRequest], lora_loads: list[tuple[int, str]],
                  num_proposed: list[int]) -> None:
        rows = [replace(r, all_token_ids=None) for r in batch]  # the proposer's history stays on rank 0
        self.group.send(("step", rows, list(lora_loads), num_proposed))


@torch.inference_mode()
def run_step(runner, batch: list[ScheduledRequest], lora_loads, num_proposed: list[int]) -> None:
    """The forward rank 0 runs for this batch (ModelRunner.execute, minus proposing and sampling)."""
    if runner.lora is not None:
        runner.lora.load_pending(lora_loads)
    input_ids, positions, meta, last_token = runner.prepare(SchedulerOutput(batch))
    if runner.lora is not None:
        runner.lora.set_batch([r.num_tokens for r in batch], [r.lora_slot for r in batch])
    hidden = runner.model(input_ids, positions, runner.kv_caches, meta)  # [tokens, hidden]
    sampled = [i for i, r in enumerate(batch) if r.sample]
    if not sampled:
        return
    if any(num_proposed):  # the logits rank 0 verifies: each proposal's position and the last
        idx = []
        for pos, i in zip(last_token.tolist(), sampled):
            idx.extend(range(pos - num_proposed[i], pos + 1))
        last_token = torch.tensor(idx, device=runner.device)
    runner.model.compute_logits(hidden[last_token])  # the gather; the logits themselves are rank 0's


def serve(engine) -> None:
    """A rank > 0's loop: receive a step, run its forward, until rank 0 says stop."""
    group = engine.tp
    steps = 0
    while True:
        message = group.receive()
        if message[0] == "stop":
            logger.info("tensor-parallel rank %d: stop after %d steps", group.rank, steps)
            return
        _, batch, lora_loads, num_proposed = message
        run_step(engine.runner, batch, lora_loads, num_proposed)
        steps += 1


def worker_main() -> int:
    """Entry point of a rank the engine started: its orders come pickled on stdin."""
    import pickle

    job = pickle.load(sys.stdin.buffer)
    rank = job["rank"]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(name)s[tp rank {rank}]: %(message)s")
    group = worker_group(rank, job["world"], job["port"], job["device"], job["parent"])
    config = job["config"]
    try:
        from batchgen.engine import Engine

        Engine(config)  # builds its shards and serves until rank 0 stops it (Engine.__init__ -> serve)
    except TensorParallelError as e:
        logger.error("%s", e)
        return 1
    finally:
        group.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
