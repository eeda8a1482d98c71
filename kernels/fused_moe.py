"""fused_moe: a mixture-of-experts MLP (SiLU-gated experts) over a flat token batch.

Semantics (HF's Mixtral / Qwen-MoE expert block, given the router's choice):
    for every token t and each of its top-k picks (e = ids[t, j], p = weights[t, j]):
        gate, up = (x[t] @ w13[e].T).split(inter)             # w13 = [gate; up] stacked on dim 1
        out[t] += p * ((silu(gate) * up) @ w2[e].T)
    The sum over the k picks is taken in fp32 and rounded once to x's dtype.
Shapes:
    x        # [tokens, hidden]
    w13      # [experts, 2 * inter, hidden]
    w2       # [experts, hidden, inter]
    weights  # [tokens, k] fp32 (the routed weights, already renormalized where the model does)
    ids      # [tokens, k] int64 expert index of each pick
    out      # [tokens, hidden]

The Triton path sorts the tokens' (token, pick) rows by expert and pads each expert's rows to a
multiple of BLOCK_M (`align_by_expert`), so every row tile of the grouped GEMM belongs to one expert:
GEMM 1 gathers x rows straight from the token batch, GEMM 2 multiplies by the routed weight as it
stores. `fused_moe_ref` is the per-pick reference, `fused_moe_torch` the expert-sorted torch path
(one GEMM per expert that has rows; the CPU path of the model uses it with packed weights).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._utils import dot_precision, interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use fused_moe_torch
    triton = None


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """The reference: every (token, pick) row gathers its expert's weights; no sorting."""
    t, k = ids.shape
    inter = w2.shape[2]
    rows = x.repeat_interleave(k, dim=0).float()  # [t * k, hidden]
    e = ids.reshape(-1)
    gate_up = torch.bmm(w13[e].float(), rows.unsqueeze(-1)).squeeze(-1)  # [t * k, 2 * inter]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch.bmm(w2[e].float(), h.unsqueeze(-1)).squeeze(-1)  # [t * k, hidden]
    y = y * weights.reshape(-1, 1).float()
    return y.view(t, k, -1).sum(1).to(x.dtype)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [tokens, k] -> (order [tokens * k]: flat (token, pick) rows sorted by expert, stable;
    counts [experts]: rows per expert)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


def fused_moe_torch(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                    gate_up: Callable[[int, torch.Tensor], torch.Tensor],
                    down: Callable[[int, torch.Tensor], torch.Tensor],
                    silu_mul: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The expert-sorted torch path: each expert's rows as one GEMM pair. gate_up(e, rows [n, hidden])
    -> [n, 2 * inter] and down(e, h [n, inter]) -> [n, hidden] run expert e's projections, so the
    caller chooses the GEMM (oneDNN-packed bf16 weights on CPU, or plain F.linear)."""
    t, k = ids.shape
    order, counts = sort_by_expert(ids, num_experts)
    token = order // k  # [t * k] token of each sorted row
    xs = x.index_select(0, token)  # [t * k, hidden], grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            ys[start:start + n] = down(e, silu_mul(gate_up(e, xs[start:start + n])))
        start += n
    # Back to (token, pick) order by the inverse permutation (a gather: no scatter-add), then the
    # routed weights and the sum over picks in fp32, in pick order.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y = ys.index_select(0, inverse).view(t, k, -1).float()  # [t, k, hidden]
    return torch.bmm(weights.float().unsqueeze(1), y).squeeze(1).to(x.dtype)  # sum_j w[t, j] * y[t, j]


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int):
    """The Triton path's row layout: (sorted_rows [tiles * block_m]: the flat (token, pick) row of each
    slot, each expert's rows padded to a multiple of block_m, pad slots = tokens * k (out of range);
    block_expert [tiles]: the expert of each row tile). The tile count is the bound
    cdiv(tokens * k + experts * (block_m - 1), block_m), known without reading the ids: no host sync,
    so the forward can be captured in a CUDA graph; tiles past the real ones hold only pad slots."""
    order, counts = sort_by_expert(ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m  # [experts]
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    tiles = -(-(ids.numel() + num_experts * (block_m - 1)) // block_m)
    e_sorted = ids.reshape(-1)[order]  # [t * k] expert of each sorted row
    rank = torch.arange(order.numel(), device=ids.device) - start[e_sorted]  # row's index within its expert
    sorted_rows = torch.full((tiles * block_m,), ids.numel(), dtype=torch.int64, device=ids.device)
    sorted_rows[pad_start[e_sorted] + rank] = order
    tile_start = torch.arange(tiles, device=ids.device) * block_m
    block_expert = torch.searchsorted(pad_end, tile_start, right=True).clamp_(max=num_experts - 1)
    return sorted_rows, block_expert


if triton is not None:
    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, w_ptr, c_ptr, rows_ptr, block_expert_ptr, scale_ptr,
        num_rows, N, K, a_row_div,
        stride_a, stride_we, stride_wn, stride_c,
        HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """c[row, n] = sum_k a[row // a_row_div, k] * w[expert, n, k] (* scale[row]) for the rows of one
        expert tile; rows >= num_rows are padding and neither read nor stored."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < num_rows
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        a_rows = (rows // a_row_div).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + a_rows[:, None] * stride_a + kk[None, :],
                        mask=valid[:, None] & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + expert * stride_we + n[None, :] * stride_wn + kk[:, None],
                        mask=(n[None, :] < N) & (kk[:, None] < K), other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 as raw bits: dot in fp32 there
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PRECISION)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rows, mask=valid, other=0.0)[:, None]
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_c + n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (n[None, :] < N))


def _gemm(a, w, out, sorted_rows, block_expert, num_rows, a_row_div, scale, block_m):
    n, k = w.shape[1], w.shape[2]
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_rows, block_expert, scale if scale is not None else a,
        num_rows, n, k, a_row_div, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(a.dtype), UPCAST=a.dtype == torch.bfloat16 and interpreted(_grouped_gemm_kernel),
    )


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, block_m: int = 16) -> torch.Tensor:
    """The Triton path (CUDA, or the interpreter): two grouped GEMMs over the expert-aligned rows."""
    t, k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    if t == 0:
        return torch.zeros_like(x)
    sorted_rows, block_expert = align_by_expert(ids, num_experts, block_m)
    gate_up = torch.empty(t * k, two_inter, dtype=x.dtype, device=x.device)  # [t * k, 2 * inter]
    _gemm(x, w13, gate_up, sorted_rows, block_expert, t * k, k, None, block_m)  # row r reads token r // k
    inter = two_inter // 2
    h = (F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()).to(x.dtype)  # [t * k, inter]
    y = torch.empty(t * k, hidden, dtype=torch.float32, device=x.device)  # fp32: the pick sum rounds once
    _gemm(h, w2, y, sorted_rows, block_expert, t * k, 1, weights.reshape(-1).float().contiguous(), block_m)
    return y.view(t, k, hidden).sum(1).to(x.dtype)
