"""LoRA shrink / expand over a token batch that mixes adapters (SGMV, Punica-style).

The batch is cut into segments of consecutive tokens that use the same adapter slot:
segment i is tokens seg_starts[i]:seg_starts[i+1] and uses slot w[i] = seg_slots[i] (-1: no
adapter, skipped). Several segments may use the same slot. One launch serves the whole mixed
batch; the slot, and with it the rank, is chosen per segment.

Semantics (per segment i with w = seg_slots[i] >= 0, rows = seg_starts[i]:seg_starts[i+1],
r = ranks[w]):
    lora_shrink:  h[rows, :r] = x[rows] @ A[w, :r]^T          h[rows, r:] = 0
    lora_expand:  y[rows]    += h[rows, :r] @ B[w, :, :r]^T    (nothing when r == 0)
so that shrink then expand is  y[rows] += x[rows] @ A[w]^T @ B[w]^T  (any scale is folded into B).
Rows of segments with w < 0 are left untouched in both.
Shapes:
    x           # [tokens, in] (any strides)
    A (lora_a)  # [slots, max_rank, in]   (slot-stacked, zero past each adapter's rank)
    B (lora_b)  # [slots, out, max_rank]
    h           # [tokens, max_rank] fp32
    y           # [tokens, out] (any strides: a column slice of a fused q/k/v or gate/up output)
    seg_starts  # [segments + 1] int32, seg_starts[0] = 0, seg_starts[-1] = tokens
    seg_slots   # [segments] int32
    ranks       # [slots] int32, rank of the adapter in each slot for this projection (0: none)
Accumulation is in fp32; expand adds h (cast to B's dtype) @ B^T into y in y's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import dot_precision, interpreted, next_power_of_2


@triton.jit
def _segment_tile(seg_ptr, slot_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: the adapter slot of segment program_id(0), the first token of tile
    program_id(1) within it, and the segment's end."""
    seg = tl.program_id(0)
    slot = tl.load(slot_ptr + seg).to(tl.int64)
    m0 = tl.load(seg_ptr + seg) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_ptr + seg + 1)
    return slot, m0, end


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seg_ptr, slot_ptr, rank_ptr,
    K, R,
    stride_xt, stride_xk,
    stride_al, stride_ar, stride_ak,
    stride_ht, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    slot, m0, end = _segment_tile(seg_ptr, slot_ptr, BLOCK_M)
    if slot < 0 or m0 >= end:
        return
    rank = tl.load(rank_ptr + slot)
    offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # token rows
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < end
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if rank > 0:
        a_base = a_ptr + slot * stride_al + offs_r[None, :] * stride_ar  # A[w]^T tile: [BLOCK_K, BLOCK_R]
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xt + k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            a = tl.load(a_base + k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            a = a.to(x.dtype)
            if UPCAST:  # the interpreter's dot mishandles bf16
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :] * stride_hr, acc,
             mask=m_mask[:, None] & (offs_r < R)[None, :])


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, y_ptr, seg_ptr, slot_ptr, rank_ptr,
    N,
    stride_ht, stride_hr,
    stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    slot, m0, end = _segment_tile(seg_ptr, slot_ptr, BLOCK_M)
    if slot < 0 or m0 >= end:
        return
    rank = tl.load(rank_ptr + slot)
    if rank == 0:
        return
    offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < end
    n_mask = offs_n < N
    r_mask = offs_r < rank
    h = tl.load(h_ptr + offs_m[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    b = tl.load(b_ptr + slot * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # B[w]^T tile: [BLOCK_R, BLOCK_N]
    h = h.to(b.dtype)  # as the reference: h rounded to B's dtype, products accumulated in fp32
    if UPCAST:  # the interpreter's dot mishandles bf16
        h, b = h.to(tl.float32), b.to(tl.float32)
    acc = tl.dot(h, b, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _upcast(dtype: torch.dtype, kernel) -> bool:
    return dtype == torch.bfloat16 and interpreted(kernel)


def _precision(dtype: torch.dtype, kernel) -> str:
    return "ieee" if _upcast(dtype, kernel) else dot_precision(dtype)


def _max_seg_len(seg_starts: torch.Tensor, max_seg_len: int | None) -> int:
    if max_seg_len is not None:
        return max_seg_len
    return int((seg_starts[1:] - seg_starts[:-1]).max()) if seg_starts.numel() > 1 else 0


def _block_m(max_seg_len: int) -> int:
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 64 else 64


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                ranks: torch.Tensor, out: torch.Tensor | None = None, max_seg_len: int | None = None) -> torch.Tensor:
    """h = x @ A[slot]^T per segment (see the module docstring). x [tokens, in], A [slots, max_rank, in]
    -> h [tokens, max_rank] fp32 (fresh zeros unless `out`; rows of w < 0 segments left as they are)."""
    tokens, k = x.shape
    _, r_max, k_a = lora_a.shape
    assert k_a == k, f"A has in={k_a}, x has {k}"
    h = out if out is not None else torch.zeros(tokens, r_max, dtype=torch.float32, device=x.device)
    assert h.shape == (tokens, r_max)
    num_segs = seg_slots.numel()
    longest = _max_seg_len(seg_starts, max_seg_len)
    if tokens == 0 or num_segs == 0 or longest == 0:
        return h
    block_m = _block_m(longest)
    grid = (num_segs, triton.cdiv(longest, block_m))
    _lora_shrink_kernel[grid](
        x, lora_a, h, seg_starts, seg_slots, ranks,
        k, r_max,
        *x.stride(), *lora_a.stride(), *h.stride(),
        BLOCK_M=block_m, BLOCK_R=max(16, next_power_of_2(r_max)), BLOCK_K=min(128, max(16, next_power_of_2(k))),
        PRECISION=_precision(x.dtype, _lora_shrink_kernel), UPCAST=_upcast(x.dtype, _lora_shrink_kernel),
    )
    return h


def lora_expand(h: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, seg_starts: torch.Tensor,
                seg_slots: torch.Tensor, ranks: torch.Tensor, max_seg_len: int | None = None) -> torch.Tensor:
    """y += h[:, :rank] @ B[slot, :, :rank]^T per segment, in place (see the module docstring).
    h [tokens, max_rank], B [slots, out, max_rank], y [tokens, out] (any strides). Returns y."""
    tokens, r_max = h.shape
    _, n, r_b = lora_b.shape
    assert r_b == r_max and y.shape == (tokens, n), f"h {tuple(h.shape)}, B {tuple(lora_b.shape)}, y {tuple(y.shape)}"
    num_segs = seg_slots.numel()
    longest = _max_seg_len(seg_starts, max_seg_len)
    if tokens == 0 or num_segs == 0 or longest == 0:
        return y
    block_m = _block_m(longest)
    block_n = min(128, max(16, next_power_of_2(n)))
    grid = (num_segs, triton.cdiv(longest, block_m), triton.cdiv(n, block_n))
    _lora_expand_kernel[grid](
        h, lora_b, y, seg_starts, seg_slots, ranks,
        n,
        *h.stride(), *lora_b.stride(), *y.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, next_power_of_2(r_max)),
        PRECISION=_precision(lora_b.dtype, _lora_expand_kernel), UPCAST=_upcast(lora_b.dtype, _lora_expand_kernel),
    )
    return y


def _segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor):
    starts = seg_starts.tolist()
    for i, w in enumerate(seg_slots.tolist()):
        if w >= 0 and starts[i + 1] > starts[i]:
            yield starts[i], starts[i + 1], w


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
                    ranks: torch.Tensor, out: torch.Tensor | None = None, max_seg_len: int | None = None
                    ) -> torch.Tensor:
    """Torch reference of `lora_shrink` (one matmul per segment, fp32)."""
    tokens, r_max = x.shape[0], lora_a.shape[1]
    h = out if out is not None else torch.zeros(tokens, r_max, dtype=torch.float32, device=x.device)
    rank_of = ranks.tolist()
    for s, e, w in _segments(seg_starts, seg_slots):
        r = rank_of[w]
        h[s:e] = 0
        h[s:e, :r] = x[s:e].float() @ lora_a[w, :r].float().T  # [seg, r]
    return h


def lora_expand_ref(h: torch.Tensor, lora_b: torch.Tensor, y: torch.Tensor, seg_starts: torch.Tensor,
                    seg_slots: torch.Tensor, ranks: torch.Tensor, max_seg_len: int | None = None) -> torch.Tensor:
    """Torch reference of `lora_expand` (one matmul per segment, fp32 accumulation)."""
    rank_of = ranks.tolist()
    for s, e, w in _segments(seg_starts, seg_slots):
        r = rank_of[w]
        if r == 0:
            continue
        delta = h[s:e, :r].to(lora_b.dtype).float() @ lora_b[w, :, :r].float().T  # [seg, out]
        y[s:e] = (y[s:e].float() + delta).to(y.dtype)
    return y
