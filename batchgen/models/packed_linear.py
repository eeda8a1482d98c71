"""Linear layers with their weights pre-packed for oneDNN's CPU GEMM.

bf16 (AMX / AVX512-BF16): `F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked
layout on every call; at decode shapes ([rows, 576] x [576, 1536] on the embedded model) that
reorder costs about as much as the GEMM itself. Packing once at load time (what inductor's CPU
freezing does) gives bit-identical results 1.2-2.5x faster.
fp32 on non-Intel CPUs: `F.linear` calls MKL's sgemm, which is not tuned for them; oneDNN's packed
AVX2 kernels ran the embedded model's decode GEMMs 1.4-2x faster on a Zen EPYC (docs/PERFORMANCE.md).
The results differ from MKL's by fp32 round-off (another summation order). Intel CPUs keep MKL.
The dense weight is dropped: a packed layer keeps only its shape.
"""

from __future__ import annotations

import torch
from torch import nn

_BATCH_HINT = 64  # oneDNN picks its blocking for about this many rows; any row count works


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        from batchgen.models.loader import cpu_is_intel

        return not cpu_is_intel()
    if dtype != torch.bfloat16:
        return False
    try:
        return bool(ops._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> an opaque oneDNN tensor for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] -> [rows, out], the same as F.linear(x, weight, bias)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_weight(linear.weight)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_linears(model: nn.Module) -> None:
    """Swap every nn.Linear inside `model` for a PackedLinear (in place; call once weights are loaded)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PackedLinear(child))
