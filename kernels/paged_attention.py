"""paged_attention: causal attention of a mixed flat batch (decodes, prefill and extend chunks)
over the paged KV cache, in one entry point.

Semantics (per row r, per query head h, with group = heads // kv_heads):
    s, e = cu_seqlens_q[r], cu_seqlens_q[r+1]; q_len = e - s; ctx = context_lens[r]
    keys/values of the row: token j < ctx lives at slot block_tables[r, j // block_size] * block_size
                            + j % block_size of kv_cache[0] / kv_cache[1]
    query i (token s + i) sits at position p = ctx - q_len + i and attends keys 0..p:
    out[s + i, h] = softmax(scale * q[s + i, h] . K[0..p, h // group]) @ V[0..p, h // group]
`ctx` counts the row's tokens already in the cache INCLUDING this step's (store_kv writes first).
Options: window > 0 (sliding-window attention) keeps only keys at positions > p - window;
softcap > 0 (Gemma 2) caps each scaled score as softcap * tanh(score / softcap) before the softmax.
Shapes:
    q             # [tokens, heads, head_dim] (any strides)
    kv_cache      # [2, num_blocks, block_size, kv_heads, head_dim], K then V
    cu_seqlens_q  # [rows + 1] int32, row r owns tokens cu_seqlens_q[r]:cu_seqlens_q[r+1]
    context_lens  # [rows] int32, ctx >= q_len >= 1
    block_tables  # [rows, max_blocks] int32, covering ctx tokens of each row
    returns       # [tokens, heads, head_dim], q's dtype
Rows of one query token run split-K (flash decoding): each (row, KV head, split) program loads a
K/V tile once for all `group` query heads of that KV head, and a small kernel merges the splits by
their log-sum-exp. Rows of several tokens run flash-attention style: a program takes a tile of
queries x the group's query heads of one KV head and streams K/V tiles up to its causal limit with
an online softmax. Rows may come in any order; each kernel skips the rows of the other.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._utils import dot_precision, interpreted, next_power_of_2

_LOG2E = 1.4426950408889634


@triton.jit
def _row_of_tile(cu_q_ptr, tile, num_rows, BLOCK_Q: tl.constexpr):
    """The row of query tile `tile`: row r's tiles start at cu_q[r] // BLOCK_Q + r (binary search)."""
    lo = 0
    hi = num_rows
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh_off, pos, n_valid, keep, d, d_valid,
                 qk_scale, softcap, stride_cb, stride_co, stride_cd,
                 PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr):
    """One tile of keys at positions `pos` [BLOCK_N] (valid where n_valid) into the online softmax of
    queries q [M, BLOCK_D] (log2 domain): scores where `keep` [M, BLOCK_N] is False count as -inf.
    Returns the updated running max m_i [M], sum l_i [M] and accumulator acc [M, BLOCK_D]."""
    blk = tl.load(bt_row + pos // PAGE, mask=n_valid, other=0).to(tl.int64)
    kv_off = blk * stride_cb + (pos % PAGE).to(tl.int64) * stride_co + kvh_off  # [BLOCK_N]
    k = tl.load(k_cache_ptr + kv_off[None, :] + d[:, None] * stride_cd,
                mask=d_valid[:, None] & n_valid[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
    if UPCAST:  # the interpreter multiplies bf16 as raw bits: dot in fp32 there
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:  # qk_scale carries log2(e): cap the natural-log score, then back to log2
        x = s * (0.6931471805599453 / softcap)
        s = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * (softcap * 1.4426950408889634)  # softcap * tanh(x)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_new = tl.where(m_new > float("-inf"), m_new, 0.0)  # a query that has seen no key yet
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :] * stride_cd,
                mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_q_ptr, ctx_ptr, bt_ptr, qk_scale, softcap, window, num_rows,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Rows with q_len > 1. Grid (tokens // BLOCK_Q + rows, kv_heads): enough query tiles for every
    row without a host-side look at the row lengths (row r owns tiles cu_q[r] // BLOCK_Q + r ...,
    the spare ones return at once). Tile row m is query q_tile * BLOCK_Q + m // GROUP of head
    kv_head * GROUP + m % GROUP."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    row = _row_of_tile(cu_q_ptr, tile, num_rows, BLOCK_Q)
    q_start = tl.load(cu_q_ptr + row)
    q_tile = tile - (q_start // BLOCK_Q + row)
    q_len = tl.load(cu_q_ptr + row + 1) - q_start
    if q_len <= 1:  # decode rows belong to the split-K kernel
        return
    if q_tile * BLOCK_Q >= q_len:
        return
    ctx = tl.load(ctx_ptr + row)

    m = tl.arange(0, BLOCK_M)
    qi = q_tile * BLOCK_Q + m // GROUP  # query index within the row
    head = kvh * GROUP + m % GROUP
    m_valid = (m < BLOCK_Q * GROUP) & (qi < q_len)
    q_pos = ctx - q_len + qi  # its position: it sees keys 0..q_pos
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:  # the interpreter multiplies bf16 as raw bits: dot in fp32 there
        q = q.to(tl.float32)

    kv_end = tl.minimum(ctx, ctx - q_len + (q_tile + 1) * BLOCK_Q)  # keys the tile's last query sees
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    kvh_off = kvh.to(tl.int64) * stride_ch
    # Sliding window: keys older than the window of the tile's first query are never read.
    kv_lo = tl.where(window > 0, tl.maximum(ctx - q_len + q_tile * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    for start in range(kv_lo, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        n_valid = pos < kv_end
        keep = (pos[None, :] <= q_pos[:, None]) & n_valid[None, :]  # causal
        keep = keep & ((pos[None, :] > q_pos[:, None] - window) | (window == 0))
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh_off, pos, n_valid,
                                     keep, d, d_valid, qk_scale, softcap, stride_cb, stride_co, stride_cd,
                                     PAGE, DOT_PRECISION, UPCAST, SOFTCAP)
    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, cu_q_ptr, ctx_ptr, bt_ptr,
    qk_scale, softcap, window, partition, num_splits, num_rows,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_co, stride_ch, stride_cd,
    stride_bt,
    HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Rows with q_len == 1. Grid (rows, kv_heads, num_splits); split s covers keys
    [s * partition, (s + 1) * partition). Without SPLIT it writes the output; with SPLIT, the
    unnormalised accumulator, max and sum of its split to part_acc [rows, heads, splits, head_dim]
    and part_ml [2, rows, heads, splits] (fp32)."""
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + row)
    q_len = tl.load(cu_q_ptr + row + 1) - q_start
    if q_len != 1:
        return
    ctx = tl.load(ctx_ptr + row)
    kv_start = split * partition
    if kv_start >= ctx:
        return
    kv_end = tl.minimum(kv_start + partition, ctx)

    g = tl.arange(0, BLOCK_G)
    head = kvh * GROUP + g
    g_valid = g < GROUP
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    tok = q_start.to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    kvh_off = kvh.to(tl.int64) * stride_ch
    kv_lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # sliding window: the last `window` keys
    for start in range(kv_start, kv_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        n_valid = pos < kv_end
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, bt_row, kvh_off, pos, n_valid,
                                     (n_valid & (pos >= kv_lo))[None, :], d, d_valid, qk_scale, softcap,
                                     stride_cb, stride_co, stride_cd, PAGE, DOT_PRECISION, UPCAST, SOFTCAP)

    if SPLIT:
        part = (row.to(tl.int64) * HEADS + head) * num_splits + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=g_valid[:, None] & d_valid[None, :])
        tl.store(part_ml_ptr + part, m_i, mask=g_valid)
        tl.store(part_ml_ptr + num_rows * HEADS * num_splits + part, l_i, mask=g_valid)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, cu_q_ptr, ctx_ptr, partition, num_splits, num_rows,
    stride_ot, stride_oh, stride_od,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (rows, heads): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the row's splits."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + row)
    if tl.load(cu_q_ptr + row + 1) - q_start != 1:
        return
    ctx = tl.load(ctx_ptr + row)
    n = tl.cdiv(ctx, partition)
    s = tl.arange(0, BLOCK_S)
    s_valid = s < n
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    part = (row.to(tl.int64) * HEADS + head) * num_splits + s  # [BLOCK_S]
    m = tl.load(part_ml_ptr + part, mask=s_valid, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + num_rows * HEADS * num_splits + part, mask=s_valid, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # 0 for the splits past the context
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
                  mask=s_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=d_valid)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_partition(rows: int, kv_heads: int, max_ctx: int, device: torch.device, block_n: int) -> int:
    """Tokens per decode split: split long contexts only while the grid would not fill the GPU."""
    whole = triton.cdiv(max_ctx, block_n) * block_n
    if device.type != "cuda":
        return whole
    want = min(triton.cdiv(2 * _num_sms(device), max(1, rows * kv_heads)), triton.cdiv(max_ctx, 256), 64)
    if want <= 1:
        return whole
    return triton.cdiv(triton.cdiv(max_ctx, want), block_n) * block_n


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, *,
                    max_q_len: int | None = None, max_context_len: int | None = None,
                    out: torch.Tensor | None = None, partition_size: int | None = None,
                    block_m: int = 64, block_n: int | None = None, has_decode: bool = True,
                    window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Causal paged attention of a mixed batch; see the module docstring.

    q [tokens, heads, head_dim]; kv_cache [2, num_blocks, block_size, kv_heads, head_dim];
    cu_seqlens_q [rows + 1], context_lens [rows], block_tables [rows, max_blocks] (int32).
    max_q_len / max_context_len: host-side maxima (read from the tensors when None: a device sync).
    partition_size: tokens per decode split (a multiple of block_n; None picks one for the GPU).
    block_m: query rows (queries x grouped heads) per prefill tile; block_n: keys per tile (None: 64,
    32 for fp32, whose tiles take twice the shared memory). has_decode=False: the caller knows no row
    has one query token, so the split-K kernels (and their scratch) are not launched.
    window: sliding-window size (0: none); softcap: attention-logit softcap (0: none).
    Returns out [tokens, heads, head_dim].
    """
    tokens, heads, head_dim = q.shape
    _, _, page, kv_heads, cache_dim = kv_cache.shape
    assert cache_dim == head_dim and heads % kv_heads == 0, (q.shape, kv_cache.shape)
    assert kv_cache.dtype == q.dtype, "q and the KV cache must share a dtype"
    rows = context_lens.shape[0]
    assert cu_seqlens_q.shape == (rows + 1,) and block_tables.shape[0] == rows
    out = torch.empty_like(q) if out is None else out
    if tokens == 0 or rows == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    group = heads // kv_heads
    qk_scale = float(scale) * _LOG2E
    block_d = max(16, next_power_of_2(head_dim))
    block_n = max(16, next_power_of_2(block_n or (32 if q.element_size() > 2 else 64)))
    precision = dot_precision(q.dtype)
    upcast = q.dtype == torch.bfloat16 and interpreted(_decode_kernel)  # see the kernels
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    common_strides = (*q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0))

    if max_q_len > 1:
        block_m = max(16, next_power_of_2(block_m), next_power_of_2(group))
        block_q = block_m // group
        grid = (tokens // block_q + rows, kv_heads)
        _prefill_kernel[grid](
            q, k_cache, v_cache, out, cu_seqlens_q, context_lens, block_tables, qk_scale, float(softcap or 1.0),
            int(window), rows,
            *common_strides,
            GROUP=group, HEAD_DIM=head_dim, PAGE=page,
            BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
            DOT_PRECISION=precision, UPCAST=upcast, SOFTCAP=bool(softcap),
        )

    # Rows of one token: split-K. Launched whenever some row may have one query token; programs of
    # other rows return at once.
    if not has_decode:
        return out
    if partition_size is None:
        partition_size = _pick_partition(rows, kv_heads, max_context_len, q.device, block_n)
    partition_size = triton.cdiv(partition_size, block_n) * block_n
    num_splits = triton.cdiv(max_context_len, partition_size)
    split = num_splits > 1
    if split:
        part_acc = torch.empty(rows * heads * num_splits * head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2 * rows * heads * num_splits, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _decode_kernel[(rows, kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_acc, part_ml, cu_seqlens_q, context_lens, block_tables,
        qk_scale, float(softcap or 1.0), int(window), partition_size, num_splits, rows,
        *common_strides,
        HEADS=heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=split, DOT_PRECISION=precision, UPCAST=upcast, SOFTCAP=bool(softcap),
    )
    if split:
        _merge_splits_kernel[(rows, heads)](
            out, part_acc, part_ml, cu_seqlens_q, context_lens, partition_size, num_splits, rows,
            *out.stride(),
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_S=max(2, next_power_of_2(num_splits)), BLOCK_D=block_d,
        )
    return out


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                        window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Torch reference of `paged_attention`: a plain loop over rows, softmax in fp32."""
    _, heads, head_dim = q.shape
    _, _, page, kv_heads, _ = kv_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    cu, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    for r, ctx in enumerate(ctxs):
        s, e = cu[r], cu[r + 1]
        q_len = e - s
        if q_len == 0:
            continue
        blocks = block_tables[r, :math.ceil(ctx / page)].long()
        k = kv_cache[0, blocks].reshape(-1, kv_heads, head_dim)[:ctx].float().repeat_interleave(group, 1)
        v = kv_cache[1, blocks].reshape(-1, kv_heads, head_dim)[:ctx].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale  # [heads, q_len, ctx]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = ctx - q_len + torch.arange(q_len, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, ctx]
        if window:
            visible &= torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None] - window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
