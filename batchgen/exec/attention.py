"""Attention over the paged KV cache, torch backend (CPU and GPU).

The flat batch puts single-token rows (decodes, and prefill remainders of one token) first and
multi-token chunks (prefill, extend) after them. Single-token rows run as one batched SDPA over
their block tables, padded to the longest context and masked; each chunk runs its own SDPA over its
cached prefix plus itself, causal. The step's new K/V are written into the cache first, so a chunk
reads its own keys from the same place as its prefix.

KV cache per layer: [2, num_blocks, block_size, kv_heads, head_dim] (K then V).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in 2.5


@dataclass
class ChunkSegment:
    """A multi-token chunk of one request: queries q[q_start:q_start+q_len] at positions
    ctx_len-q_len .. ctx_len-1, attending to the first ctx_len tokens of its block table."""
    q_start: int
    q_len: int
    ctx_len: int
    block_ids: torch.Tensor  # [blocks covering ctx_len]
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, None when the chunk starts at position 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] flat slot (block * block_size + offset) of each new token
    num_single: int  # rows with one query token; they come first in the batch
    single_block_tables: torch.Tensor | None  # [num_single, max_blocks], padded with block 0
    single_mask: torch.Tensor | None  # [num_single, 1, 1, max_blocks * block_size] bool, True = attend
    chunks: list[ChunkSegment] = field(default_factory=list)
    max_position: int = 0


def _sdpa(q, k, v, mask, scale, causal=False):
    """q: [..., heads, q_len, d]; k, v: [..., kv_heads, kv_len, d]; grouped-query heads by broadcast."""
    if q.shape[-3] != k.shape[-3]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]; returns [tokens, heads, d]."""
    _, num_blocks, block_size, kv_heads, d = kv_cache.shape
    heads = q.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.view(-1, kv_heads, d).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)

    def gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        # index_select over whole blocks as rows is a plain row copy: far faster on CPU than
        # advanced indexing of the 4-D cache.
        rows = cache.view(num_blocks, -1).index_select(0, blocks.reshape(-1))
        return rows.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, kv_heads, d)

    n = meta.num_single
    if n:
        group = heads // kv_heads
        keys = gather(k_cache, meta.single_block_tables).transpose(1, 2)  # [n, kv_heads, ctx, d]
        vals = gather(v_cache, meta.single_block_tables).transpose(1, 2)
        # The query heads of one KV head attend as a group: no K/V expansion needed.
        qs = q[:n].view(n, kv_heads, group, d)  # [n, kv_heads, group, d]
        out[:n] = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=meta.single_mask,
                                                 scale=scale).view(n, heads, d)

    for c in meta.chunks:
        keys = gather(k_cache, c.block_ids)[:c.ctx_len].transpose(0, 1)  # [kv_heads, ctx, d]
        vals = gather(v_cache, c.block_ids)[:c.ctx_len].transpose(0, 1)
        qc = q[c.q_start:c.q_start + c.q_len].transpose(0, 1)  # [heads, q_len, d]
        o = _sdpa(qc, keys, vals, c.mask, scale, causal=c.mask is None)
        out[c.q_start:c.q_start + c.q_len] = o.transpose(0, 1)
    return out
