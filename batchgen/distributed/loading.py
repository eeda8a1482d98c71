"""Stream a rank's shard of every checkpoint tensor: no rank reads, let alone holds, the whole model.

safetensors' `get_slice` reads only the requested rows/columns of a tensor from the file, so each
rank's peak is its own shard plus one replicated tensor (a norm, a bias) at a time. A fused tensor
(Phi-3's qkv_proj, stacked experts) is read as one slice per part, concatenated: [q_r | k_r | v_r].
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from batchgen.distributed.layers import ShardPlan
from batchgen.models.loader import safetensors_files


def iter_shards(model_dir: str, plan: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, this rank's slice of the tensor) from every *.safetensors file of a directory."""
    from safetensors import safe_open

    for file in safetensors_files(model_dir):  # the same shards the one-rank loader reads
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                cut = plan.cut_of(name)
                if cut is None:
                    yield name, f.get_tensor(name)
                    continue
                dim, ranges = cut
                part = f.get_slice(name)
                shape = part.get_shape()
                pieces = []
                for start, stop in ranges:  # one per fused part (one for an unfused tensor)
                    if dim >= len(shape) or stop > shape[dim]:
                        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(shape)}: no slice "
                                         f"[{start}:{stop}] along dim {dim} for tensor-parallel rank {plan.rank}")
                    pieces.append(part[(slice(None),) * dim + (slice(start, stop),)])
                yield name, pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
