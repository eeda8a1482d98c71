"""A MoE layer over this rank's slice of every expert (tensor parallelism).

Each expert is a SiLU-gated MLP, so it splits like a dense one along its intermediate dim I: a rank
keeps the rows [I/N slice of gate | I/N slice of up] of w13 (the fused layout, per rank) and the same
columns of w2, and its output is a partial sum. The routed weights multiply each expert's output and the
sigmoid gate multiplies the shared expert's, both linear in that partial sum, so one all-reduce after
experts + shared expert gives the full output. The router and the shared-expert gate are replicated:
every rank routes the same (all-reduced, hence identical) hidden states to the same experts.
The expert kernels (the CPU GEMM pairs, packed or not, and the Triton grouped GEMM) read I from the
weights' shapes and run unchanged on the slices.
"""

from __future__ import annotations

import torch

from batchgen.distributed.group import TPGroup
from batchgen.models.moe import SparseMoE


class ParallelSparseMoE(SparseMoE):
    """w13 [E, 2I/N, H], w2 [E, H, I/N], shared expert [2S/N, H] / [H, S/N]; output all-reduced."""

    def __init__(self, full: SparseMoE, group: TPGroup):
        world = group.world_size
        super().__init__(full.gate.in_features, full.inter // world, full.num_experts, full.top_k, full.renormalize,
                         full.shared_inter // world, full.round_weights)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] (the same on every rank) -> [tokens, hidden]."""
        return self.group.all_reduce(super().forward(x))
