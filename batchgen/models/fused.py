"""The model's fused elementwise ops, dispatched once per call to the fastest implementation here:
the C++ kernels on CPU (kernels/cpu_ops.py), the Triton kernels on CUDA (kernels/rms_norm.py,
kernels/rotary.py), and their torch references anywhere else (e.g. BATCHGEN_CPU_KERNELS=0).

All three share one semantics (the references), so switching implementation changes rounding at
most, never the math.
"""

from __future__ import annotations

import torch

from batchgen.kernels import cpu_ops
from batchgen.kernels.rms_norm import rms_norm_ref
from batchgen.kernels.rotary import rotary_embedding_ref


def _cpu_kernels(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and cpu_ops.load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [tokens, hidden] -> norm(x), or with a residual (norm(x + residual), x + residual)."""
    if _cpu_kernels(x):
        return cpu_ops.rms_norm(x, weight, eps, residual)
    if x.is_cuda:
        from batchgen.kernels.rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [tokens, 2 * inter] -> silu(gate) * up [tokens, inter]."""
    if _cpu_kernels(gate_up):
        return cpu_ops.silu_mul(gate_up)
    return cpu_ops.silu_mul_ref(gate_up)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
    """RoPE in place on q [tokens, heads, d] and k [tokens, kv_heads, d]; cos, sin [max_pos, d]."""
    if _cpu_kernels(q):
        cpu_ops.rotary_embedding_(q, k, cos, sin, positions)
    elif q.is_cuda:
        from batchgen.kernels.rotary import rotary_embedding

        rotary_embedding(q, k, cos, sin, positions, inplace=True)
    else:
        qr, kr = rotary_embedding_ref(q, k, cos, sin, positions)
        q.copy_(qr)
        k.copy_(kr)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [rows, n] -> [rows] int64, the first index of each row's maximum (torch.argmax's tie rule)."""
    if _cpu_kernels(x) and x.stride(-1) == 1:
        return cpu_ops.argmax(x)
    return x.argmax(dim=-1)
