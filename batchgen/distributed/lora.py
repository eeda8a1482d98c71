"""Cut LoRA adapters to match their sharded projections.

For y = x W^T with the LoRA delta (x A^T) B^T:
- column-parallel targets (q, k, v, gate, up) keep their output rows: B's rows as W's, A whole;
- row-parallel targets (o, down) keep their input columns: A's columns as W's, B whole. Each rank's
  delta is then a partial sum, all-reduced by the LoRA layer (LoRAWeights.reduce) like the base output.
"""

from __future__ import annotations

from dataclasses import replace

from batchgen.distributed.layers import ShardPlan
from batchgen.lora.adapters import LoRAAdapter

_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def shard_adapter(adapter: LoRAAdapter, plan: ShardPlan) -> LoRAAdapter:
    weights = {}
    for (layer, target), (a, b, scale) in adapter.weights.items():
        dim, start, stop = plan.slice_of(f"model.layers.{layer}.{_MODULE[target]}.{target}.weight")
        if dim == 0:  # output rows
            b = b[start:stop].contiguous()  # [out / N, r]
        else:  # input columns
            a = a[:, start:stop].contiguous()  # [r, in / N]
        weights[(layer, target)] = (a, b, scale)
    return replace(adapter, weights=weights)
