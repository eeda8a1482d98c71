"""Shared-prefix (cascade) decode attention: rows whose block tables begin with the same blocks
attend those blocks in one pass for the whole group, then each row its own remainder; the two
passes merge by log-sum-exp. C++ on CPU (kernels/cpu_decode_attention.py), Triton on GPU (here).

Semantics (one query token per row r, at position ctx_lens[r] - 1; kv head = h // (heads / kv_heads)):
    out[r, h] = softmax(q[r, h] @ K_r[:, kv].T * scale) @ V_r[:, kv]    (the plain decode attention)
over the first ctx_lens[r] tokens of row r's blocks, for every row, grouped or not. Groups:
    group g = rows group_rows[group_starts[g]:group_starts[g+1]] (a row in at most one group);
    their block tables all begin with the same group_blocks[g] blocks (> 0), and each member's
    context reaches past them: group_blocks[g] * block_size < ctx_lens[r].
The shared pass takes the group's stacked queries [members x heads, d] against the shared K/V
(each tile read once per group, not once per row: a GEMM-shaped pass); every row then continues
its online softmax over tokens group_blocks[g] * block_size .. ctx - 1 from that state.
Shapes: q [rows, heads, head_dim]; group_rows [n] int, group_starts [groups + 1] int, group_blocks
[groups] int. CPU: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim], block_tables
[rows, max_blocks] int64, ctx_lens [rows] int64. Triton: kv_cache [2, num_blocks, block_size,
kv_heads, head_dim], block_tables int32, ctx_lens int32. Returns [rows, heads, head_dim], q's dtype.

`cascade_decode_attention_ref` is the torch reference: the two passes and the merge written out.
"""

from __future__ import annotations

import torch

from .cpu_decode_attention import heads_contiguous
from .cpu_decode_attention import load as _load_cpu


def cascade_decode_attention_cpu(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, group_rows,
                                 group_starts, group_blocks) -> torch.Tensor:
    """The C++ kernel (see kernels/cpu_decode_attention.py); tensors on CPU."""
    return _load_cpu().cascade_decode_attention(heads_contiguous(q), k_cache, v_cache, block_tables, ctx_lens, scale,
                                                group_rows, group_starts, group_blocks)


def cascade_decode_attention_ref(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, group_rows,
                                 group_starts, group_blocks) -> torch.Tensor:
    """Torch reference: per group, the shared pass for all members at once ([members, heads, T]
    scores against the first member's shared blocks), each row's own pass, merged by log-sum-exp."""
    rows, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    shared = [0] * rows  # shared blocks per row
    members_of = []
    starts = [int(x) for x in group_starts]
    for g in range(len(starts) - 1):
        members = [int(x) for x in group_rows[starts[g]:starts[g + 1]]]
        members_of.append((members, int(group_blocks[g])))
        for r in members:
            shared[r] = int(group_blocks[g])

    def kv(r, lo, hi):  # tokens lo..hi-1 of row r: [hi - lo, heads, d] fp32 (KV heads expanded)
        blocks = block_tables[r, :-(-hi // block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, d)[lo:hi].float().repeat_interleave(group, 1)
        v = v_cache[blocks].reshape(-1, kv_heads, d)[lo:hi].float().repeat_interleave(group, 1)
        return k, v

    qs = q.float() * scale  # [rows, heads, d]
    o_shared = torch.zeros(rows, heads, d)
    lse_shared = torch.full((rows, heads), float("-inf"))
    for members, nb in members_of:
        k, v = kv(members[0], 0, nb * block_size)  # [T, heads, d]
        s = torch.einsum("rhd,thd->rht", qs[members], k)  # [members, heads, T]
        lse_shared[members] = s.logsumexp(-1)
        o_shared[members] = torch.einsum("rht,thd->rhd", s.softmax(-1), v)
    out = torch.empty_like(q)
    for r in range(rows):
        k, v = kv(r, shared[r] * block_size, int(ctx_lens[r]))
        s = torch.einsum("hd,thd->ht", qs[r], k)  # [heads, own tokens]
        lse_own = s.logsumexp(-1)
        o_own = torch.einsum("ht,thd->hd", s.softmax(-1), v)
        m = torch.maximum(lse_own, lse_shared[r])
        w_own, w_shared = (lse_own - m).exp(), (lse_shared[r] - m).exp()  # [heads]
        out[r] = ((w_own[:, None] * o_own + w_shared[:, None] * o_shared[r]) / (w_own + w_shared)[:, None]).to(q.dtype)
    return out


def cascade_decode_attention_triton(q, kv_cache, block_tables, ctx_lens, scale: float, group_rows, group_starts,
                                    group_blocks, *, max_group_rows: int, out=None) -> torch.Tensor:
    """The Triton kernels (kernels/cascade_attention_triton.py); imported on first use."""
    from .cascade_attention_triton import cascade_decode_attention as _triton

    return _triton(q, kv_cache, block_tables, ctx_lens, scale, group_rows, group_starts, group_blocks,
                   max_group_rows=max_group_rows, out=out)
