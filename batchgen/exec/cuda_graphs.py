"""CUDA graphs of the model's forward for decode-only steps, one per bucketed batch size.

A small decode step on a GPU is mostly kernel-launch overhead (a few dozen launches per layer). The
forward of a decode-only batch (every row one token, Triton attention, no adapters in the batch) is
captured once per bucket size after the KV pool exists, then replayed: the step's inputs are copied
into static buffers, rows past the real batch are padding.

Padding rows must not touch anything real: they write their K/V into a reserved null block that the
block pool never hands out (the engine allocates one block more than it manages), attend to one
token of it, and their outputs are dropped. Attention is captured with the pool's largest context
(`max_model_len`), so the split-K grid is fixed; splits past a row's context contribute nothing.

`capture=False` keeps the same static-buffer path but runs the forward eagerly at replay time: how
CPU tests check the padding and buffer logic against the eager runner.
"""

from __future__ import annotations

import bisect
import logging

import torch

from batchgen.cache.kv_manager import cdiv
from batchgen.exec.attention import AttentionMetadata

logger = logging.getLogger("batchgen")


def bucket_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_rows (vLLM's buckets): padding stays under 8 rows."""
    sizes = [s for s in (1, 2, 4) if s < max_rows] + list(range(8, max_rows + 8, 8))
    return sorted({min(s, max_rows) for s in sizes})


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_rows: int, max_model_len: int, block_size: int,
                 null_block: int, device: torch.device, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = bucket_sizes(max_rows)
        self.max_rows = self.sizes[-1]
        self.max_model_len = max_model_len
        self.null_block = null_block
        self.null_slot = null_block * block_size
        self.capture_graphs = capture
        max_blocks = cdiv(max_model_len, block_size)
        n = self.max_rows
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), self.null_slot, dtype=torch.long, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks), null_block, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, rows: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:rows], num_single=rows, max_position=self.max_model_len - 1,
            cu_seqlens_q=self.cu_seqlens_q[:rows + 1], context_lens=self.context_lens[:rows],
            block_tables=self.block_tables[:rows], max_q_len=1, max_context_len=self.max_model_len)

    def _forward(self, rows: int) -> torch.Tensor:
        return self.model(self.input_ids[:rows], self.positions[:rows], self.kv_caches, self._meta(rows))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones then fit in its memory pool)."""
        if not self.capture_graphs:
            return
        # Tables the forward would otherwise build during capture.
        self.model.rope_tables(self.max_model_len, self.input_ids.new_empty(0, dtype=self.kv_caches[0].dtype))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for rows in reversed(self.sizes):
                for _ in range(2):  # compile the Triton kernels and settle allocations outside the capture
                    self._forward(rows)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[rows] = self._forward(rows)
                self.pool = graph.pool()
                self.graphs[rows] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batches of %s rows", ", ".join(map(str, self.sizes)))

    def fits(self, rows: int) -> bool:
        return rows <= self.max_rows

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The eager forward's result for a decode-only batch (meta from ModelRunner.prepare, Triton
        fields filled): hidden [rows, hidden]."""
        rows = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, rows)]
        width = meta.block_tables.shape[1]
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slot_mapping[:rows].copy_(meta.slot_mapping)
        self.context_lens[:rows].copy_(meta.context_lens)
        self.block_tables[:rows, :width].copy_(meta.block_tables)
        # Padding rows: the null block (their inputs may hold a previous step's rows).
        self.slot_mapping[rows:size].fill_(self.null_slot)
        self.context_lens[rows:size].fill_(1)
        self.block_tables[rows:size, 0].fill_(self.null_block)
        if not self.capture_graphs:
            return self._forward(size)[:rows]
        self.graphs[size].replay()
        return self.outputs[size][:rows]
