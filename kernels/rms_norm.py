"""rms_norm: RMSNorm, optionally fused with the residual add that precedes it.

Semantics (HF numerics: statistics in fp32, the normalised value rounded to x's dtype before the
weight multiplies it):
    h = x + residual                      (rounded to x's dtype; h = x without a residual)
    out = weight * (h.float() * rsqrt(mean(h.float() ** 2, -1) + eps)).to(x.dtype)
    returns out, or (out, h) with a residual: h is the residual stream for the next layer.
Shapes:
    x, residual  # [tokens, hidden] (rows may be strided; the hidden dim is contiguous)
    weight       # [hidden]
    out, h       # [tokens, hidden]
One program per token; `out=` / `residual_out=` may alias x / residual (in-place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_power_of_2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < HIDDEN
    x = tl.load(x_ptr + t * stride_x + i, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + t * stride_r + i, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + t * stride_ro + i, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    y = (xf * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + i, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """x [tokens, hidden] -> out, or (out, x + residual) when a residual [tokens, hidden] is given."""
    tokens, hidden = x.shape
    assert x.stride(1) == 1 and weight.shape == (hidden,)
    out = torch.empty_like(x) if out is None else out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
    res, res_out = (residual, residual_out) if residual is not None else (x, out)  # unused without
    if tokens:
        _rms_norm_kernel[(tokens,)](
            x, res, weight, out, res_out, float(eps),
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
            HIDDEN=hidden, BLOCK=next_power_of_2(hidden), HAS_RESIDUAL=residual is not None,
            num_warps=4 if hidden <= 2048 else 8,
        )
    return out if residual is None else (out, residual_out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Torch reference of `rms_norm` (batchgen's / HF's RMSNorm)."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)
