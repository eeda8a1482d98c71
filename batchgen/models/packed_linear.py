"""Linear layers with their weights pre-packed for oneDNN's CPU GEMM.

bf16 (AMX / AVX512-BF16): `F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked
layout on every call; at decode shapes ([rows, 576] x [576, 1536] on the embedded model) that
reorder costs about as much as the GEMM itself. Packing once at load time (what inductor's CPU
freezing does) gives bit-identical results 1.2-2.5x faster.
fp32 on non-Intel CPUs: `F.linear` calls MKL's sgemm, which is not tuned for them; oneDNN's packed
AVX2 kernels ran the embedded model's decode GEMMs 1.4-2x faster on a Zen EPYC (docs/PERFORMANCE.md).
The results differ from MKL's by fp32 round-off (another summation order). Intel CPUs keep MKL.
Among those, CPUs with AVX2 and no AVX-512 take batchgen's own register-blocked fp32 kernel instead
(kernels/cpu_avx2_linear.py): it runs the decode GEMMs closer to the FMA peak than oneDNN.
On CPUs with AMX-BF16 tiles, bf16 layers whose shapes allow it take batchgen's own AMX kernel
(kernels/cpu_amx_linear.py) instead: it streams the weights faster at decode row counts, and the
Llama MLP's gate/up projection runs the SwiGLU activation in its epilogue (`PackedGateUp.silu_mul`).
Its results equal oneDNN's up to fp32 summation order.
The dense weight is dropped: a packed layer keeps only its shape.
"""

from __future__ import annotations

import torch
from torch import nn

from batchgen.kernels import cpu_amx_linear, cpu_avx2_linear

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


def _use_amx(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and cpu_amx_linear.supports(*weight.shape) and cpu_amx_linear.available())


def _use_avx2(weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.float32 and weight.device.type == "cpu"
            and cpu_avx2_linear.supports(*weight.shape) and cpu_avx2_linear.available())


def _backend(weight: torch.Tensor) -> str:
    """"amx" or "avx2" (batchgen's kernels) where they apply, else "onednn"."""
    return "amx" if _use_amx(weight) else "avx2" if _use_avx2(weight) else "onednn"


def _fp32_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float().contiguous()  # batchgen's kernels add it in fp32


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias, with weight [out, in] pre-packed (AMX tiles, AVX2 panels or oneDNN's layout)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.backend = _backend(weight)
        pack = {"amx": cpu_amx_linear.pack, "avx2": cpu_avx2_linear.pack}.get(self.backend, pack_weight)
        self.packed = pack(weight)
        self.bias = bias if self.backend == "onednn" else _fp32_bias(bias)  # as the backend takes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "amx":
            return cpu_amx_linear.linear(x, self.packed, self.bias, self.out_features)
        if self.backend == "avx2":
            return cpu_avx2_linear.linear(x, self.packed, self.bias, self.out_features)
        return packed_linear(x, self.packed, self.bias)


class PackedGateUp(nn.Module):
    """A fused [gate; up] projection (weight [2 * inter, in]) in the AMX gate_up layout: `forward` is
    the projection, `silu_mul(x)` is silu(gate) * up without the projection going to memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.inter = self.out_features // 2
        self.packed = cpu_amx_linear.pack_gate_up(weight)
        self.bias = _fp32_bias(bias)

    @staticmethod
    def applies(weight: torch.Tensor) -> bool:
        return weight.shape[0] % (2 * cpu_amx_linear.TILE_N) == 0 and _use_amx(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_amx_linear.gate_up(x, self.packed, self.bias, self.inter, silu_mul=False)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_amx_linear.gate_up(x, self.packed, self.bias, self.inter, silu_mul=True)


def pack_linears(model: nn.Module) -> None:
    """Swap every nn.Linear inside `model` for a PackedLinear (in place; call once weights are loaded);
    layers named gate_up_proj ([gate; up] halves) become a PackedGateUp where the AMX kernel runs."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                gated = child_name == "gate_up_proj" and PackedGateUp.applies(child.weight)
                setattr(module, child_name, (PackedGateUp if gated else PackedLinear)(child.weight, child.bias))
