"""Triton kernels of shared-prefix (cascade) decode attention; Semantics: kernels/cascade_attention.py.

Two launches. The shared pass: grid (groups, kv_heads, chunks of BLOCK_R member rows); a program
stacks its members' queries of one KV head ([BLOCK_R x GROUP, head_dim]) and streams the group's
shared K/V tiles through an online softmax (tl.dot: tensor cores on GPU), leaving each query's
running max, sum and accumulator in fp32 scratch. The own pass: grid (rows, kv_heads); a program
starts from that state (or empty for a row in no group) and streams the row's remaining tokens,
then writes acc / sum. Both reuse paged_attention's tile step (`_attend_tile`, log2 domain).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import dot_precision, interpreted, next_power_of_2
from .paged_attention import _LOG2E, _attend_tile


@triton.jit
def _shared_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, state_acc_ptr, state_ml_ptr, rows_ptr, starts_ptr, blocks_ptr, bt_ptr,
    qk_scale, num_rows,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Tile row m is member chunk * BLOCK_R + m // GROUP, head kv_head * GROUP + m % GROUP."""
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    first = tl.load(starts_ptr + g)
    n_members = tl.load(starts_ptr + g + 1) - first
    if chunk * BLOCK_R >= n_members:
        return
    m = tl.arange(0, BLOCK_M)
    member = chunk * BLOCK_R + m // GROUP
    m_valid = (m < BLOCK_R * GROUP) & (member < n_members)
    row = tl.load(rows_ptr + first + member, mask=m_valid, other=0).to(tl.int64)
    head = kvh * GROUP + m % GROUP
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:  # the interpreter multiplies bf16 as raw bits: dot in fp32 there
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    owner = tl.load(rows_ptr + first).to(tl.int64)  # the shared blocks, from the first member's table
    bt_row = bt_ptr + owner * stride_bt
    kvh_off = kvh.to(tl.int64) * stride_ch
    shared_len = tl.load(blocks_ptr + g) * PAGE
    for start in range(0, shared_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        n_valid = pos < shared_len
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh_off, pos, n_valid,
                                     n_valid[None, :], d, d_valid, qk_scale, 0.0, stride_cb, stride_co, stride_cd,
                                     PAGE, DOT_PRECISION, UPCAST, False)  # no softcap: such layers skip cascade
    slot = row * HEADS + head  # [BLOCK_M]
    tl.store(state_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=m_valid[:, None] & d_valid[None, :])
    tl.store(state_ml_ptr + slot, m_i, mask=m_valid)
    tl.store(state_ml_ptr + num_rows * HEADS + slot, l_i, mask=m_valid)


@triton.jit
def _own_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, state_acc_ptr, state_ml_ptr, start_ptr, ctx_ptr, bt_ptr,
    qk_scale, num_rows,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (rows, kv_heads): tokens start[row] .. ctx - 1, from the shared pass's state where start > 0."""
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + row)
    t0 = tl.load(start_ptr + row)
    g = tl.arange(0, BLOCK_G)
    head = kvh * GROUP + g
    g_valid = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    tok = row.to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    slot = tok * HEADS + head  # [BLOCK_G]
    has_state = g_valid & (tl.zeros([BLOCK_G], tl.int32) + t0 > 0)
    m_i = tl.load(state_ml_ptr + slot, mask=has_state, other=float("-inf"))
    l_i = tl.load(state_ml_ptr + num_rows * HEADS + slot, mask=has_state, other=0.0)
    acc = tl.load(state_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :],
                  mask=has_state[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    bt_row = bt_ptr + tok * stride_bt
    kvh_off = kvh.to(tl.int64) * stride_ch
    for start in range(t0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        n_valid = pos < ctx
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh_off, pos, n_valid,
                                     n_valid[None, :], d, d_valid, qk_scale, 0.0, stride_cb, stride_co, stride_cd,
                                     PAGE, DOT_PRECISION, UPCAST, False)  # no softcap: such layers skip cascade
    o = acc / l_i[:, None]
    tl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])


def cascade_decode_attention(q, kv_cache, block_tables, ctx_lens, scale: float, group_rows, group_starts,
                             group_blocks, *, max_group_rows: int, out=None, block_r: int = 16,
                             block_n: int | None = None) -> torch.Tensor:
    """q [rows, heads, head_dim] (any strides); kv_cache [2, num_blocks, block_size, kv_heads, head_dim];
    block_tables [rows, max_blocks] int32; ctx_lens [rows] int32; group_rows / group_starts /
    group_blocks int32 on q's device; max_group_rows: the largest group (host side, sizes the grid)."""
    rows, heads, head_dim = q.shape
    _, _, page, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    num_groups = group_blocks.shape[0]
    if rows == 0:
        return out
    block_d = max(16, next_power_of_2(head_dim))
    block_n = max(16, next_power_of_2(block_n or (32 if q.element_size() > 2 else 64)))
    precision = dot_precision(q.dtype)
    upcast = q.dtype == torch.bfloat16 and interpreted(_own_kernel)
    qk_scale = float(scale) * _LOG2E
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    state_acc = torch.empty(rows * heads * head_dim, dtype=torch.float32, device=q.device)
    state_ml = torch.empty(2 * rows * heads, dtype=torch.float32, device=q.device)
    # Where each row's own pass starts: after its group's shared blocks (0 for rows in no group).
    start = torch.zeros(rows, dtype=torch.int32, device=q.device)
    if num_groups:
        sizes = (group_starts[1:] - group_starts[:-1]).long()
        start[group_rows.long()] = (group_blocks.repeat_interleave(sizes) * page).to(torch.int32)
        block_r = max(1, min(block_r, max_group_rows))
        block_m = max(16, next_power_of_2(block_r * group))
        block_r = block_m // group
        grid = (num_groups, kv_heads, triton.cdiv(max_group_rows, block_r))
        _shared_kernel[grid](
            q, k_cache, v_cache, state_acc, state_ml, group_rows, group_starts, group_blocks, block_tables,
            qk_scale, rows, *q.stride(), *k_cache.stride(), block_tables.stride(0),
            HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page,
            BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_PRECISION=precision, UPCAST=upcast,
        )
    _own_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, state_acc, state_ml, start, ctx_lens, block_tables,
        qk_scale, rows, *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0),
        HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=precision, UPCAST=upcast,
    )
    return out
