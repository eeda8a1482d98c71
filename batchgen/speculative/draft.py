"""Draft-model proposer: a smaller model with the target's tokenizer guesses k tokens per row.

The draft keeps a KV cache of its own shape over the target's block ids and slot mapping: it
computes every position the target computes (prefill chunks and plain decodes in `observe`, the
last token and its proposals in `propose`), so a block the target has cached holds valid draft KV too.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from batchgen.exec.model_runner import batch_order
from batchgen.exec.sampler import Sampler, filtered_probs
from batchgen.sched.output import ScheduledRequest, SchedulerOutput


class DraftProposer:
    def __init__(self, model, kv_caches: list[torch.Tensor], prepare, device: torch.device, seed: int):
        self.model = model
        self.kv_caches = kv_caches  # per layer [2, num_blocks, block_size, kv_heads, head_dim], target's block ids
        self.prepare = prepare  # the target runner's input builder: same layout, same slots
        # Its own shared random stream; a row with a seed draws from a generator seeded like the target's.
        self.sampler = Sampler(seed + 1, device)

    def forget(self, request_ids: list[str]) -> None:
        self.sampler.forget(request_ids)

    def _forward(self, rows: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, positions, meta, last = self.prepare(SchedulerOutput(rows))
        return self.model(input_ids, positions, self.kv_caches, meta), last

    def observe(self, rows: list[ScheduledRequest], proposals: list[list[int]]) -> None:
        rest = [r for r, p in zip(rows, proposals) if not p]
        if rest:
            self._forward([rest[i] for i in batch_order(rest)])

    def propose(self, rows: list[ScheduledRequest]) -> tuple[list[list[int]], list]:
        proposals: list[list[int]] = [[] for _ in rows]
        dists: list[list[torch.Tensor]] = [[] for _ in rows]
        tokens = [r.token_ids[-1] for r in rows]
        for j in range(max(r.num_spec for r in rows) + 1):
            active = [i for i, r in enumerate(rows) if j <= r.num_spec]
            step = [replace(rows[i], token_ids=[tokens[i]], start_pos=rows[i].start_pos + j, sample=True)
                    for i in active]
            hidden, last = self._forward(step)
            # At j == num_spec the forward only writes the last proposal's KV (the target may accept it).
            pick = [n for n, i in enumerate(active) if j < rows[i].num_spec]
            if not pick:
                break
            logits = self.model.compute_logits(hidden[last[pick]]).float()  # [rows proposing, vocab]
            for row_logits, n in zip(logits, pick):
                i = active[n]
                if rows[i].params.greedy:
                    token = int(row_logits.argmax())
                else:
                    q = filtered_probs(row_logits.unsqueeze(0), [rows[i]])[0]
                    noise = torch.empty_like(q).exponential_(generator=self.sampler.generator_for(rows[i]))
                    token = int((q / noise).argmax())
                    dists[i].append(q)
                proposals[i].append(token)
                tokens[i] = token
        return proposals, [torch.stack(d) if d else None for d in dists]
