"""store_kv: write a step's new keys and values into the paged KV cache.

Semantics:
    for t in range(tokens) with slot_mapping[t] >= 0:
        b, o = divmod(slot_mapping[t], block_size)
        kv_cache[0, b, o] = k[t]; kv_cache[1, b, o] = v[t]
Shapes:
    k, v          # [tokens, kv_heads, head_dim] (any strides)
    kv_cache      # [2, num_blocks, block_size, kv_heads, head_dim], K then V, same dtype as k
    slot_mapping  # [tokens] int32/int64, slot = block * block_size + offset; < 0 skips the token
One program per token copies all of its heads (heads * head_dim elements) for K and V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import next_power_of_2


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cb, stride_co, stride_ch, stride_cd,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    dst = cache_ptr + blk * stride_cb + off * stride_co + h * stride_ch + d * stride_cd
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [tokens, kv_heads, head_dim] into kv_cache [2, blocks, block_size, kv_heads, head_dim]."""
    tokens, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and kv_cache.shape[0] == 2 and kv_cache.shape[3:] == (kv_heads, head_dim)
    assert slot_mapping.shape == (tokens,)
    if tokens == 0:
        return
    _store_kv_kernel[(tokens,)](
        k, v, kv_cache, slot_mapping,
        *k.stride(), *v.stride(), *kv_cache.stride(),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_H=next_power_of_2(kv_heads), BLOCK_D=next_power_of_2(head_dim),
    )


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Torch reference of `store_kv`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_heads, head_dim = kv_cache.shape[3:]
    kv_cache[0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k[keep].to(kv_cache.dtype))
    kv_cache[1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v[keep].to(kv_cache.dtype))
