"""Tensor-parallel layers and the in-place sharding of a Llama-family model (built on the meta device).

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

`ShardPlan.slice_of(hf_name)` says which part of each checkpoint tensor a rank keeps; the loader
(loading.py) reads just that part, and the LoRA sharding (lora.py) cuts adapters the same way. A
MoE layer adds its experts' gate/up (dim 0) and down (dim 1) to `slice_of` along the intermediate dim.
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


@dataclass
class ShardPlan:
    """Which slice of each HF checkpoint tensor this rank keeps."""
    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int

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

    def inter_range(self) -> tuple[int, int]:
        n = self.intermediate // self.world
        return self.rank * n, (self.rank + 1) * n

    def slice_of(self, hf_name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the tensor this rank keeps, or None: the whole tensor (replicated)."""
        parts = hf_name.split(".")
        module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if module == "q_proj":
            return (0, *self.q_range())
        if module in ("k_proj", "v_proj"):
            return (0, *self.kv_range())
        if module in ("gate_proj", "up_proj"):
            return (0, *self.inter_range())
        if module == "o_proj" and kind == "weight":
            return (1, *self.q_range())
        if module == "down_proj" and kind == "weight":
            return (1, *self.inter_range())
        if module in ("embed_tokens", "lm_head") and kind == "weight":
            return (0, *self.vocab_range())
        return None  # norms, o/down biases (added once, after the all-reduce)


def check_divisible(config, world: int) -> None:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % world:
        raise ValueError(f"tensor_parallel_size={world} must divide num_attention_heads={heads}")
    if kv % world and world % kv:
        raise ValueError(f"tensor_parallel_size={world} and num_key_value_heads={kv}: one must divide the other "
                         "(KV heads are sharded, or replicated when there are fewer than ranks)")
    if config.intermediate_size % world:
        raise ValueError(f"tensor_parallel_size={world} must divide intermediate_size={config.intermediate_size}")


def shard_model(model: nn.Module, group: TPGroup) -> ShardPlan:
    """Swap in this rank's shards of every projection, the embedding and the LM head (in place, on the meta
    device, before the weights are loaded). Sets `model.tp_plan` and `model.tp_full_dims` (LoRA checks)."""
    from batchgen.lora.adapters import ProjectionDims
    from batchgen.models.llama import MLP, Attention, LlamaForCausalLM

    config, world = model.config, group.world_size
    if type(model).load_weights is not LlamaForCausalLM.load_weights or not all(
            isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, MLP) for layer in model.layers):
        raise ValueError(f"tensor_parallel_size={world}: {type(model).__name__} is not sharded yet (tensor "
                         "parallelism covers Llama, Mistral, Qwen2 and Qwen3); use tensor_parallel_size=1")
    check_divisible(config, world)
    model.tp_full_dims = ProjectionDims.of_model(model)
    attn0 = model.layers[0].self_attn
    plan = ShardPlan(group.rank, world, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
                     config.intermediate_size, config.vocab_size)
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
