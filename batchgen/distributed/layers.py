"""Tensor-parallel layers and the in-place sharding of a model (built on the meta device): the Llama family,
MoE, Gemma and Phi-3, which share its attention and MLP modules.

Megatron's split, one all-reduce per attention and per MLP:
- column-parallel q/k/v and gate/up: each rank keeps its heads' (its intermediate slice's) output rows
  of every part and still runs ONE fused GEMM: qkv [q_local | k_local | v_local], gate_up
  [gate_local | up_local]. No communication: attention and SiLU-and-mul are local to a rank's slice.
- row-parallel o and down: each rank multiplies its input slice; the partial sums are all-reduced,
  then the (replicated) bias is added once.
- KV heads: num_kv_heads / N per rank, or, when num_kv_heads < N, one KV head per rank, replicated
  on the N / num_kv_heads ranks whose query heads share it.
- vocab-parallel embedding (each rank looks up its vocabulary rows, zero elsewhere, all-reduce) and LM
  head (each rank's vocabulary rows; the logits are gathered for sampling on rank 0).
- MoE layers (experts.py): every expert sliced along its intermediate dim like a dense MLP, the shared
  expert too; router and shared-expert gate replicated; one all-reduce per MoE layer.

`ShardPlan.cut_of(hf_name)` says which part of each checkpoint tensor a rank keeps (for a fused tensor,
one range per part: Phi-3's qkv_proj / gate_up_proj, stacked experts' gate_up_proj); the loader
(loading.py) reads just that part, and the LoRA sharding (lora.py) cuts adapters the same way
(`slice_of`, the one-range case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.distributed.group import TPGroup


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: weight [out, in / N] (this rank's input columns), bias [out]."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: TPGroup):
        super().__init__(in_local, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(F.linear(x, self.weight))  # [tokens, out], the sum over ranks
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding table on this rank; the lookup is all-reduced."""

    def __init__(self, start: int, end: int, hidden: int, group: TPGroup):
        super().__init__()
        self.start, self.end, self.group = start, end, group
        self.weight = nn.Parameter(torch.empty(end - start, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)  # [tokens]
        x = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)  # [tokens, hidden]
        x = x * mine.unsqueeze(1).to(x.dtype)
        return self.group.all_reduce(x)


class GatheredLogits:
    """Wraps a model's compute_logits: every rank's vocabulary slice, gathered into the full logits."""

    def __init__(self, local_logits, vocab_size: int, per_rank: int, group: TPGroup):
        self.local_logits, self.vocab_size, self.per_rank, self.group = local_logits, vocab_size, per_rank, group

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.local_logits(hidden)  # [rows, this rank's vocab rows]
        if local.shape[1] < self.per_rank:  # the last rank's slice may be short: pad to the common width
            local = F.pad(local, (0, self.per_rank - local.shape[1]))
        return self.group.all_gather_cat(local)[:, :self.vocab_size]  # [rows, vocab]


Cut = tuple[int, list[tuple[int, int]]]  # (dim, [(start, stop), ...]): ranges concatenated along dim


@dataclass
class ShardPlan:
    """Which slice of each HF checkpoint tensor this rank keeps."""
    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int  # the dense MLPs'
    vocab_size: int
    expert_intermediate: int = 0  # each routed expert's (MoE), 0 without experts
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert's

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.world)

    def vocab_range(self) -> tuple[int, int]:
        start = self.rank * self.vocab_per_rank
        return start, min(self.vocab_size, start + self.vocab_per_rank)

    def q_range(self) -> tuple[int, int]:
        n = self.num_heads // self.world * self.head_dim
        return self.rank * n, (self.rank + 1) * n

    def kv_range(self) -> tuple[int, int]:
        if self.num_kv_heads >= self.world:
            n = self.num_kv_heads // self.world * self.head_dim
            return self.rank * n, (self.rank + 1) * n
        head = self.rank // (self.world // self.num_kv_heads)  # replicated: the KV head of this rank's queries
        return head * self.head_dim, (head + 1) * self.head_dim

    def part(self, size: int) -> tuple[int, int]:
        """This rank's equal slice of a dimension of `size` (an intermediate dim)."""
        n = size // self.world
        return self.rank * n, (self.rank + 1) * n

    def inter_range(self) -> tuple[int, int]:
        return self.part(self.intermediate)

    def slice_of(self, hf_name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of an unfused tensor this rank keeps (LoRA targets, dense projections), or
        None: the whole tensor (replicated)."""
        cut = self.cut_of(hf_name)
        if cut is None:
            return None
        dim, ranges = cut
        if len(ranges) != 1:
            raise ValueError(f"{hf_name!r} is fused: its shard is {len(ranges)} ranges, not one slice")
        return dim, *ranges[0]

    def cut_of(self, hf_name: str) -> Cut | None:
        """The ranges of a checkpoint tensor this rank keeps, or None: the whole tensor (replicated). Fused
        tensors keep one range per part, so a rank's shard keeps the fused layout ([q | k | v], [gate | up])."""
        parts = hf_name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if module == "experts":  # stacked experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            start, stop = self.part(self.expert_intermediate)
            if kind == "gate_up_proj":
                return 1, [(start, stop), (self.expert_intermediate + start, self.expert_intermediate + stop)]
            if kind == "down_proj":
                return 2, [(start, stop)]
        if ".experts." in hf_name or ".shared_expert." in hf_name:  # one expert: [I, H] gate/up, [H, I] down
            size = self.expert_intermediate if ".experts." in hf_name else self.shared_intermediate
            if module in ("gate_proj", "up_proj", "w1", "w3") and kind == "weight":
                return 0, [self.part(size)]
            if module in ("down_proj", "w2") and kind == "weight":
                return 1, [self.part(size)]
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if module == "qkv_proj" and kind == "weight":  # Phi-3's fused [q | k | v] rows
            (q0, q1), (k0, k1) = self.q_range(), self.kv_range()
            return 0, [(q0, q1), (q + k0, q + k1), (q + kv + k0, q + kv + k1)]
        if module == "gate_up_proj" and kind == "weight":  # Phi-3's fused [gate | up] rows
            start, stop = self.inter_range()
            return 0, [(start, stop), (self.intermediate + start, self.intermediate + stop)]
        if module == "q_proj":
            return 0, [self.q_range()]
        if module in ("k_proj", "v_proj"):
            return 0, [self.kv_range()]
        if module in ("gate_proj", "up_proj"):
            return 0, [self.inter_range()]
        if module == "o_proj" and kind == "weight":
            return 1, [self.q_range()]
        if module == "down_proj" and kind == "weight":
            return 1, [self.inter_range()]
        if module in ("embed_tokens", "lm_head") and kind == "weight":
            return 0, [self.vocab_range()]
        return None  # norms, routers, o/down biases (added once, after the all-reduce)


def check_divisible(config, world: int, intermediates: dict[str, int]) -> None:
    """intermediates: config field -> size, each sliced across the ranks."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % world:
        raise ValueError(f"tensor_parallel_size={world} must divide num_attention_heads={heads}")
    if kv % world and world % kv:
        raise ValueError(f"tensor_parallel_size={world} and num_key_value_heads={kv}: one must divide the other "
                         "(KV heads are sharded, or replicated when there are fewer than ranks)")
    for name, size in intermediates.items():
        if size % world:
            raise ValueError(f"tensor_parallel_size={world} must divide {name}={size}")


def shard_model(model: nn.Module, group: TPGroup) -> ShardPlan:
    """Swap in this rank's shards of every projection, MoE expert, the embedding and the LM head (in place,
    on the meta device, before the weights are loaded). Sets `model.tp_plan` and `model.tp_full_dims`
    (LoRA checks)."""
    from batchgen.distributed.experts import ParallelSparseMoE
    from batchgen.lora.adapters import ProjectionDims
    from batchgen.models.llama import MLP, Attention
    from batchgen.models.moe import SparseMoE

    config, world = model.config, group.world_size
    if not all(isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, (MLP, SparseMoE))
               for layer in model.layers):
        raise ValueError(f"tensor_parallel_size={world}: {type(model).__name__} is not sharded yet; "
                         "use tensor_parallel_size=1")
    dense = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MLP)]
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    sizes = {}
    if dense:
        sizes["intermediate_size"] = dense[0].intermediate
    if moes:
        sizes["moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"] = \
            moes[0].inter
        if moes[0].shared_inter:
            sizes["shared_expert_intermediate_size"] = moes[0].shared_inter
    check_divisible(config, world, sizes)
    model.tp_full_dims = ProjectionDims.of_model(model)
    attn0 = model.layers[0].self_attn
    plan = ShardPlan(group.rank, world, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
                     dense[0].intermediate if dense else 0, config.vocab_size,
                     moes[0].inter if moes else 0, moes[0].shared_inter if moes else 0)
    device = attn0.qkv_proj.weight.device
    dtype = attn0.qkv_proj.weight.dtype
    with torch.device(device):
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            hidden = attn.qkv_proj.in_features
            attn.num_heads //= world
            attn.num_kv_heads = max(1, attn.num_kv_heads // world)
            attn.q_size, attn.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            attn.qkv_proj = nn.Linear(hidden, attn.q_size + 2 * attn.kv_size, bias=attn.qkv_proj.bias is not None,
                                      dtype=dtype)
            attn.o_proj = RowParallelLinear(attn.q_size, hidden, attn.o_proj.bias is not None, group).to(dtype)
            if isinstance(mlp, SparseMoE):
                layer.mlp = ParallelSparseMoE(mlp, group).to(dtype)
                continue
            mlp.intermediate //= world
            mlp.gate_up_proj = nn.Linear(hidden, 2 * mlp.intermediate, bias=mlp.gate_up_proj.bias is not None,
                                         dtype=dtype)
            mlp.down_proj = RowParallelLinear(mlp.intermediate, hidden, mlp.down_proj.bias is not None, group).to(dtype)
        start, end = plan.vocab_range()
        model.embed_tokens = VocabParallelEmbedding(start, end, config.hidden_size, group).to(dtype)
        if not model.tie_word_embeddings:
            model.lm_head = nn.Linear(config.hidden_size, end - start, bias=False, dtype=dtype)
    model.num_kv_heads = model.layers[0].self_attn.num_kv_heads
    model.compute_logits = GatheredLogits(model.compute_logits, config.vocab_size, plan.vocab_per_rank, group)
    model.tp_plan = plan
    return plan
