"""Model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

The batch is one flat sequence of tokens without padding: `input_ids`, `positions` and
`slot_mapping` are [num_tokens]; block tables are padded per row only where attention batches rows.
"""

from __future__ import annotations

import itertools
import time

import torch

from batchgen.exec.attention import AttentionMetadata, ChunkSegment
from batchgen.exec.sampler import Sampler
from batchgen.sched.output import ModelOutput, SchedulerOutput


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device: torch.device, seed: int):
        self.model = model
        self.kv_caches = kv_caches  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed, device)
        self.model_seconds = 0.0  # in the model's forward and LM head; the rest of a step is overhead

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        rows = sched.scheduled
        bs = self.block_size
        lens = [r.num_tokens for r in rows]
        starts = [r.start_pos for r in rows]
        input_ids = self._tensor(list(itertools.chain.from_iterable(r.token_ids for r in rows)))  # [tokens]

        lens_t = torch.tensor(lens)
        row_of_token = torch.repeat_interleave(torch.arange(len(rows)), lens_t)  # [tokens]
        first_token = torch.cumsum(lens_t, 0) - lens_t  # [rows]
        positions = torch.arange(int(lens_t.sum())) - first_token[row_of_token] + torch.tensor(starts)[row_of_token]

        # Block table of every row, padded with block 0 (masked out wherever it is read).
        max_blocks = max(-(-(s + n) // bs) for s, n in zip(starts, lens))
        tables = torch.tensor([r.block_ids[:max_blocks] + [0] * (max_blocks - len(r.block_ids[:max_blocks]))
                               for r in rows])  # [rows, max_blocks]
        slot_mapping = tables[row_of_token, positions // bs] * bs + positions % bs  # [tokens]

        num_single = sum(1 for n in lens if n == 1)  # the scheduler puts them first
        single_tables = single_mask = None
        if num_single:
            ctx = torch.tensor(starts[:num_single]) + 1
            width = -(-int(ctx.max()) // bs)
            single_tables = tables[:num_single, :width]
            single_mask = (torch.arange(width * bs).unsqueeze(0) < ctx.unsqueeze(1))[:, None, None, :]

        chunks = []
        for i in range(num_single, len(rows)):
            start, n = starts[i], lens[i]
            ctx = start + n
            mask = None
            if start > 0:  # causal over the cached prefix plus the chunk itself
                mask = torch.arange(ctx).unsqueeze(0) <= (start + torch.arange(n)).unsqueeze(1)
                mask = mask.to(self.device)
            chunks.append(ChunkSegment(int(first_token[i]), n, ctx, tables[i, :-(-ctx // bs)].to(self.device), mask))

        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            num_single=num_single,
            single_block_tables=None if single_tables is None else single_tables.to(self.device),
            single_mask=None if single_mask is None else single_mask.to(self.device),
            chunks=chunks,
            max_position=max(s + n for s, n in zip(starts, lens)) - 1,
        )
        last_token = (first_token + lens_t - 1)[[i for i, r in enumerate(rows) if r.sample]]  # [sampled rows]
        return input_ids, positions.to(self.device), meta, last_token.to(self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.sampler.forget(sched.finished_ids)
        input_ids, positions, meta, sample_idx = self.prepare(sched)
        t = time.perf_counter()
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [tokens, hidden]
        sampled_rows = [r for r in sched.scheduled if r.sample]
        if not sampled_rows:
            self.model_seconds += time.perf_counter() - t
            return ModelOutput([], [])
        logits = self.model.compute_logits(hidden[sample_idx])  # [sampled rows, vocab] fp32
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.model_seconds += time.perf_counter() - t
        tokens, logprobs = self.sampler(logits, sampled_rows)
        return ModelOutput(tokens, logprobs)
