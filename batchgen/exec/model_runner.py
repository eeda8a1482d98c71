"""Model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

The batch is one flat sequence of tokens without padding: `input_ids`, `positions` and
`slot_mapping` are [num_tokens]; block tables are padded per row only where attention batches rows.
"""

from __future__ import annotations

import array
import itertools
import time
from dataclasses import replace

import torch

from batchgen.cache.kv_manager import cdiv
from batchgen.exec.attention import (
    AmxChunks,
    AttentionMetadata,
    CascadeGroups,
    ChunkSegment,
    PrefixChunks,
    SingleGroup,
)
from batchgen.exec.prompt_logprobs import chunk_prompt_logprobs, needs_prompt_logprobs
from batchgen.exec.rejection import verify_greedy, verify_sampled
from batchgen.exec.sampler import Sampler, filtered_probs
from batchgen.kernels.cpu_decode_attention import amx_available
from batchgen.kernels.cpu_decode_attention import load as load_cpu_decode_kernel
from batchgen.sched.output import ModelOutput, ScheduledRequest, SchedulerOutput, shared_prefix_groups
from batchgen.speculative import Proposer

# A group must share this many KV blocks (64 tokens at block size 16) for cascade attention: below it
# the shared pass saves less than its log-sum-exp merge with each row's own pass costs.
CASCADE_MIN_BLOCKS = 4


class ModelRunner:
    # Cascade attention for one-token rows sharing >= this many leading blocks (2+ rows); 0: off.
    # The engine sets it from EngineConfig.cascade_attention.
    cascade_min_blocks = 0

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, device: torch.device, seed: int):
        self.model = model
        self.kv_caches = kv_caches  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(seed, device)
        self.proposer: Proposer | None = None  # speculative decoding: set by the engine
        # On CPU, one-token rows attend through a C++ kernel when it builds (compiled once, cached).
        self.cpu_decode_kernel = device.type == "cpu" and load_cpu_decode_kernel() is not None
        # Multi-token chunks attend through the C++ causal chunk kernel where it runs on AMX tiles
        # (bf16 caches, head_dim 64 or 128); elsewhere through SDPA (and PrefixChunks).
        self.chunks_on_amx = (self.cpu_decode_kernel and bool(kv_caches) and kv_caches[0].dtype == torch.bfloat16
                              and kv_caches[0].shape[-1] in (64, 128) and amx_available())
        self.lora = None  # multi-LoRA slots (batchgen.lora.layers.LoRAWeights): set by the engine
        self.attention_backend = "torch"  # "triton": prepare() also fills the Triton fields; set by the engine
        self.graphs = None  # batchgen.exec.cuda_graphs.DecodeGraphs: replays decode-only forwards; set by the engine
        self.tp = None  # batchgen.distributed.worker.StepSender on rank 0 of a tensor-parallel engine
        self.model_seconds = 0.0  # in the model's forward and LM head; the rest of a step is overhead

    def _tensor(self, data, dtype=torch.long) -> torch.Tensor:
        """Python ints -> a 1-D tensor on the device; int64 through `_int64`."""
        t = self._int64(data) if dtype == torch.long else torch.tensor(data, dtype=dtype)
        return t.to(self.device, non_blocking=True)

    @staticmethod
    def _int64(values) -> torch.Tensor:
        """int64 [len(values)] on the CPU from Python ints, through array.array: torch.tensor on a
        list converts element by element (a W3 decode step's block tables: 285 -> 87 us)."""
        buf = array.array("q", values)
        return torch.frombuffer(buf, dtype=torch.long) if buf else torch.empty(0, dtype=torch.long)

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        rows = sched.scheduled
        bs = self.block_size
        lens = [r.num_tokens for r in rows]
        starts = [r.start_pos for r in rows]
        input_ids = self._tensor(itertools.chain.from_iterable(r.token_ids for r in rows))  # [tokens]
        # Per token, as Python ints: its position, and its cache slot through its row's block table.
        positions = self._int64(p for s, n in zip(starts, lens) for p in range(s, s + n))  # [tokens]
        slot_mapping = self._int64(r.block_ids[p // bs] * bs + p % bs
                                   for r, s, n in zip(rows, starts, lens) for p in range(s, s + n))  # [tokens]
        lens_t = torch.tensor(lens)
        first_token = torch.cumsum(lens_t, 0) - lens_t  # [rows]

        # Block table of every row, padded with block 0 (masked out wherever it is read).
        max_blocks = max(cdiv(s + n, bs) for s, n in zip(starts, lens))
        tables = self._int64(itertools.chain.from_iterable(
            itertools.chain(r.block_ids[:max_blocks], itertools.repeat(0, max_blocks - len(r.block_ids[:max_blocks])))
            for r in rows)).view(len(rows), max_blocks)  # [rows, max_blocks]

        num_single = sum(1 for n in lens if n == 1)  # first in the batch, shortest context first
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(self.device), num_single=num_single,
                                 max_position=max(s + n for s, n in zip(starts, lens)) - 1)
        if self.attention_backend == "triton":  # every row, in batch order
            ctx_lens = [s + n for s, n in zip(starts, lens)]
            meta.cu_seqlens_q = self._tensor([0, *itertools.accumulate(lens)], torch.int32)
            meta.context_lens = self._tensor(ctx_lens, torch.int32)
            meta.block_tables = tables.to(torch.int32).to(self.device, non_blocking=True)
            meta.max_q_len, meta.max_context_len = max(lens), max(ctx_lens)
        else:
            meta.single_groups = self._single_groups(starts[:num_single], tables)
            meta.chunks = [self._chunk(int(first_token[i]), starts[i], lens[i], tables[i])
                           for i in range(num_single, len(rows))]
            if self.chunks_on_amx and meta.chunks:
                meta.amx_chunks = AmxChunks(tables[num_single:].to(self.device), first_token[num_single:].to(self.device),
                                            lens_t[num_single:].to(self.device), self._tensor(starts[num_single:]))
            elif self.cascade_min_blocks and self.cpu_decode_kernel:
                meta.prefix_chunks = self._prefix_chunks(meta.chunks, tables[num_single:])
        if self.cascade_min_blocks and (self.attention_backend == "triton" or self.cpu_decode_kernel):
            meta.cascade = self._cascade(rows[:num_single])
        last_token = (first_token + lens_t - 1)[[i for i, r in enumerate(rows) if r.sample]]  # [sampled rows]
        return input_ids, positions.to(self.device), meta, last_token.to(self.device)

    def _cascade(self, singles: list[ScheduledRequest]) -> CascadeGroups | None:
        """Groups of one-token rows sharing leading blocks, None when there is none."""
        g_rows, g_starts, g_blocks = shared_prefix_groups([r.block_ids for r in singles],
                                                          [r.start_pos + 1 for r in singles], self.block_size,
                                                          min_blocks=self.cascade_min_blocks)
        if not g_blocks:
            return None
        dtype = torch.int32 if self.attention_backend == "triton" else torch.long
        return CascadeGroups(self._tensor(g_rows, dtype), self._tensor(g_starts, dtype), self._tensor(g_blocks, dtype),
                             max(b - a for a, b in zip(g_starts, g_starts[1:])))

    def _prefix_chunks(self, chunks: list[ChunkSegment], tables: torch.Tensor) -> PrefixChunks | None:
        """Torch backend on CPU: the chunks whose cached prefix holds >= cascade_min_blocks full
        blocks and at least as many tokens as the chunk itself, None when none."""
        bs = self.block_size
        picked = [i for i, c in enumerate(chunks) if (c.ctx_len - c.q_len) // bs >= self.cascade_min_blocks
                  and c.q_len <= c.ctx_len - c.q_len]
        if not picked:
            return None
        tokens, ctx, table_rows, starts, blocks = [], [], [], [0], []
        for i in picked:
            c = chunks[i]
            start = c.ctx_len - c.q_len
            tokens.extend(range(c.q_start, c.q_start + c.q_len))
            ctx.extend(range(start + 1, c.ctx_len + 1))
            table_rows.extend([i] * c.q_len)
            starts.append(len(tokens))
            blocks.append(start // bs)
        n = len(tokens)
        return PrefixChunks(self._tensor(tokens), tables[table_rows].to(self.device), self._tensor(ctx),
                            CascadeGroups(torch.arange(n, device=self.device), self._tensor(starts),
                                          self._tensor(blocks), max(b - a for a, b in zip(starts, starts[1:]))),
                            frozenset(picked))

    def _single_groups(self, starts: list[int], tables: torch.Tensor) -> list[SingleGroup]:
        """Torch backend: the one-token rows (positions `starts`, shortest context first)."""
        bs = self.block_size
        if not starts:
            return []
        if self.cpu_decode_kernel:  # reads blocks in place: one call, no padding cost
            return [SingleGroup(0, len(starts), tables[:len(starts)], None, torch.tensor(starts) + 1)]
        groups = []
        for start, end in _similar_length_groups([cdiv(s + 1, bs) for s in starts]):
            ctx = torch.tensor(starts[start:end]) + 1
            width = cdiv(int(ctx.max()), bs)
            mask = (torch.arange(width * bs).unsqueeze(0) < ctx.unsqueeze(1))[:, None, None, :]
            groups.append(SingleGroup(start, end, tables[start:end, :width].to(self.device), mask.to(self.device)))
        return groups

    def _chunk(self, q_start: int, start: int, n: int, table: torch.Tensor) -> ChunkSegment:
        """Torch backend: a multi-token chunk of n tokens at positions start.., its queries from q_start."""
        ctx = start + n
        return ChunkSegment(q_start, n, ctx, table[:cdiv(ctx, self.block_size)].to(self.device))

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.sampler.forget(sched.finished_ids)
        if self.lora is not None:
            self.lora.load_pending(sched.lora_loads)  # adapters the scheduler swapped in for this step
        rows = sched.scheduled
        proposals: list[list[int]] = [[] for _ in rows]
        draft_probs: list = [None] * len(rows)
        if self.proposer is not None:
            self.proposer.forget(sched.finished_ids)
            spec = [i for i, r in enumerate(rows) if r.num_spec]
            if spec:
                found, dists = self.proposer.propose([rows[i] for i in spec])
                for i, p, q in zip(spec, found, dists):
                    proposals[i], draft_probs[i] = p[:rows[i].num_spec], q
            self.proposer.observe(rows, proposals)
            # Rows with proposals become multi-token chunks; one-token rows stay first.
            rows = [replace(r, token_ids=r.token_ids + p) if p else r for r, p in zip(rows, proposals)]
        order = batch_order(rows)
        batch = [rows[i] for i in order]
        input_ids, positions, meta, last_token = self.prepare(SchedulerOutput(batch))
        if self.tp is not None:  # tensor parallel: the other ranks run this same forward
            self.tp.send_step(batch, sched.lora_loads, [len(proposals[i]) for i in order])
        if self.lora is not None:  # which adapter slot each row's tokens use in this forward
            self.lora.set_batch([r.num_tokens for r in batch], [r.lora_slot for r in batch])
        t = time.perf_counter()
        if self._graphable(meta, input_ids.shape[0]):
            hidden = self.graphs.run(input_ids, positions, meta)  # [tokens, hidden]
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [tokens, hidden]
        prompt_logprobs = self._prompt_logprobs(hidden, batch)
        sampled = [i for i in order if rows[i].sample]  # scheduled indices, in batch order
        if self.sampler.structured is not None:  # grammar bitmasks on the CPU while an async (CUDA) forward runs
            self.sampler.structured.prepare([rows[i] for i in sampled])
        if not sampled:
            self.model_seconds += time.perf_counter() - t
            return ModelOutput([], [], prompt_logprobs=prompt_logprobs)
        # Logits at each sampled row's last position, and at the positions of its proposals.
        if any(proposals):
            idx, starts = [], {}
            for pos, i in zip(last_token.tolist(), sampled):
                starts[i] = len(idx)
                idx.extend(range(pos - len(proposals[i]), pos + 1))
            last_token = torch.tensor(idx, device=self.device)
        logits = self.model.compute_logits(hidden[last_token])  # [positions, vocab], model dtype
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.model_seconds += time.perf_counter() - t

        if not any(proposals):
            tokens, logprobs = self.sampler(logits, [rows[i] for i in sampled])
            result = dict(zip(sampled, zip(tokens, logprobs, [[]] * len(sampled))))
        else:
            result = self._verify(logits.float(), rows, sampled, starts, proposals, draft_probs)
        in_order = [i for i in range(len(rows)) if rows[i].sample]  # the scheduler's order
        return ModelOutput(
            token_ids=[result[i][0] for i in in_order],
            logprobs=[result[i][1] for i in in_order],
            accepted=[result[i][2] for i in in_order] if self.proposer is not None else None,
            num_proposed=[len(proposals[i]) for i in in_order] if self.proposer is not None else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: list[ScheduledRequest]) -> dict | None:
        """Rows asking for prompt_logprobs whose chunk lies in the prompt: scored chunk by chunk."""
        if not any(needs_prompt_logprobs(r) for r in batch):
            return None
        out, offset = {}, 0
        for r in batch:
            if needs_prompt_logprobs(r):
                out[r.request_id] = chunk_prompt_logprobs(self.model, hidden[offset:offset + r.num_tokens], r)
            offset += r.num_tokens
        return out

    def _graphable(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Decode-only (one token per row), no adapter in the batch, and a captured size fits."""
        return (self.graphs is not None and meta.num_single == num_tokens and meta.cu_seqlens_q is not None
                and (self.lora is None or self.lora.batch is None) and self.graphs.fits(num_tokens))

    def _verify(self, logits, rows, sampled, starts, proposals, draft_probs) -> dict[int, tuple]:
        """Plain rows sample as usual; rows with proposals accept a prefix of them and add a token."""
        result = {}
        plain = [i for i in sampled if not proposals[i]]
        if plain:
            tokens, logprobs = self.sampler(logits[[starts[i] for i in plain]], [rows[i] for i in plain])
            result.update(zip(plain, zip(tokens, logprobs, [[]] * len(plain))))
        for i in sampled:
            if not proposals[i]:
                continue
            block = logits[starts[i]:starts[i] + len(proposals[i]) + 1]  # [proposals + 1, vocab]
            row = rows[i]
            if row.params.greedy:
                accepted, token = verify_greedy(block, proposals[i])
            else:
                probs = filtered_probs(block, [row] * block.shape[0])
                accepted, token = verify_sampled(probs, proposals[i], draft_probs[i], self.sampler.generator_for(row))
            result[i] = (token, None, accepted)
        return result


def batch_order(rows: list[ScheduledRequest]) -> list[int]:
    """The forward's row order: one-token rows first (attention's decode path), the rows of one LoRA
    slot side by side (one SGMV segment each), shortest context first among those (the torch
    backend pads a group of one-token rows only to its peers)."""
    return sorted(range(len(rows)), key=lambda i: (rows[i].num_tokens != 1, rows[i].lora_slot, rows[i].start_pos))


def _similar_length_groups(blocks: list[int], slack: float = 1.25) -> list[tuple[int, int]]:
    """Split rows sorted by context blocks into runs whose longest is within `slack` of their shortest
    (plus one block), bounding the padding of a batched attention call."""
    groups, start = [], 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] > blocks[start] * slack + 1:
            groups.append((start, i))
            start = i
    return groups
