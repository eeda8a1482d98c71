"""rotary_embedding: RoPE on queries and keys, HF `rotate_half` convention.

Semantics (c = cos[positions[t]], s = sin[positions[t]], x1/x2 the halves of a head vector):
    rotate_half(x) = cat(-x2, x1)
    q_out[t, h] = q[t, h] * c + rotate_half(q[t, h]) * s      (same for k), computed in fp32
Shapes:
    q          # [tokens, heads, head_dim] (any strides: views of a fused qkv projection are fine)
    k          # [tokens, kv_heads, head_dim]
    cos, sin   # [max_positions, head_dim] (HF tables: the two halves repeat the same frequencies)
    positions  # [tokens] int
    returns    # (q_out, k_out), new contiguous tensors, or q and k themselves when inplace=True
One program per token rotates all query and key heads of that token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_power_of_2


@triton.jit
def _rotate(x_ptr, o_ptr, t, c1, s1, c2, s2, stride_xt, stride_xh, stride_xd, stride_ot, stride_oh, stride_od,
            HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < HEADS) & (i < HALF)
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + i * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + (i + HALF) * stride_xd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    obase = o_ptr + t * stride_ot + h * stride_oh
    tl.store(obase + i * stride_od, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(obase + (i + HALF) * stride_od, o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_qot, stride_qoh, stride_qod, stride_kot, stride_koh, stride_kod,
    stride_cos, stride_sin,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    im = i < HALF
    c1 = tl.load(cos_ptr + p * stride_cos + i, mask=im, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + p * stride_cos + i + HALF, mask=im, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + p * stride_sin + i, mask=im, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + p * stride_sin + i + HALF, mask=im, other=0.0).to(tl.float32)
    _rotate(q_ptr, qo_ptr, t, c1, s1, c2, s2, stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, stride_qod,
            HEADS, HALF, BLOCK_H, BLOCK_HALF)
    _rotate(k_ptr, ko_ptr, t, c1, s1, c2, s2, stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, stride_kod,
            KV_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] at positions [tokens]."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == (tokens, kv_heads, head_dim) and positions.shape == (tokens,)
    assert cos.shape == sin.shape and cos.shape[1] == head_dim and cos.stride(1) == 1 and sin.stride(1) == 1
    qo, ko = (q, k) if inplace else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                     torch.empty_like(k, memory_format=torch.contiguous_format))
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](
            q, k, qo, ko, cos, sin, positions,
            *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), cos.stride(0), sin.stride(0),
            HEADS=heads, KV_HEADS=kv_heads, HALF=half,
            BLOCK_H=next_power_of_2(heads), BLOCK_KH=next_power_of_2(kv_heads),
            BLOCK_HALF=next_power_of_2(half),
        )
    return qo, ko


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `rotary_embedding` (fp32 math, as batchgen's model does in fp32)."""
    c = cos[positions].float().unsqueeze(1)  # [tokens, 1, head_dim]
    s = sin[positions].float().unsqueeze(1)

    def rot(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rot(q), rot(k)
