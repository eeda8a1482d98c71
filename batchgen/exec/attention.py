"""Attention over the paged KV cache, torch backend (CPU and GPU).

The flat batch puts single-token rows (decodes, and prefill remainders of one token) first and
multi-token chunks (prefill, extend) after them. On CPU, single-token rows go through the C++
decode kernel (kernels/cpu_decode_attention.py), which reads their blocks in place; elsewhere they
run as batched SDPA in groups of similar context length, padded within the group and masked.
Chunks attend causally over their cached prefix plus themselves: on CPUs with AMX tiles (bf16,
head_dim 64/128) all of a step's chunks in one C++ call (AmxChunks); elsewhere chunks over a long
cached prefix as one-token rows of the cascade kernel (PrefixChunks) and the rest through one SDPA
call each. Windowed and softcapped layers always take SDPA / the math path. The step's new K/V are
written into the cache first, so a chunk reads its own keys from the same place as its prefix.

KV cache per layer: [2, num_blocks, block_size, kv_heads, head_dim] (K then V).

Per layer options: window > 0 (sliding-window attention) masks keys at positions <= pos - window;
softcap > 0 (Gemma 2) caps the scaled scores as softcap * tanh(s / softcap), on a math path (SDPA
has no softcap). The cache keeps every key: windowed layers leave their old blocks allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchgen.kernels import cpu_ops
from batchgen.kernels.cascade_attention import cascade_decode_attention_cpu
from batchgen.kernels.cpu_decode_attention import chunk_attention as cpu_chunk_attention
from batchgen.kernels.cpu_decode_attention import decode_attention as cpu_decode_attention

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in 2.5


@dataclass
class ChunkSegment:
    """A multi-token chunk of one request: queries q[q_start:q_start+q_len] at positions
    ctx_len-q_len .. ctx_len-1, attending to the first ctx_len tokens of its block table."""
    q_start: int
    q_len: int
    ctx_len: int
    block_ids: torch.Tensor  # [blocks covering ctx_len]


@dataclass
class SingleGroup:
    """One-token rows start:end (in batch order) of similar context length, attended together."""
    start: int
    end: int
    block_tables: torch.Tensor  # [rows, max_blocks], padded with block 0
    mask: torch.Tensor | None  # [rows, 1, 1, max_blocks * block_size] bool, True = attend
    ctx_lens: torch.Tensor | None = None  # [rows] int64, set when the CPU decode kernel runs the group


@dataclass
class CascadeGroups:
    """One-token rows sharing leading blocks (batch rows, the first one-token row = 0): group g is
    rows[starts[g]:starts[g+1]], sharing blocks[g] blocks (kernels/cascade_attention.py)."""
    rows: torch.Tensor  # [grouped rows] int (int64 for the torch backend, int32 for Triton)
    starts: torch.Tensor  # [groups + 1]
    blocks: torch.Tensor  # [groups]
    max_rows: int  # the largest group


@dataclass
class PrefixChunks:
    """Chunks whose cached prefix is long against their own length (a question after a shared
    system prompt), attended as one-token rows by the CPU cascade kernel: chunk c's tokens form
    group c over the prefix's full blocks (one pass over them for all the chunk's tokens and heads),
    then each token attends the rest of its causal context. The result is causal attention, as the
    SDPA path computes it."""
    tokens: torch.Tensor  # [n] int64: the chunks' tokens (indices into the batch)
    block_tables: torch.Tensor  # [n, max_blocks] int64: each token's row's blocks
    ctx_lens: torch.Tensor  # [n] int64: each token's position + 1
    groups: CascadeGroups  # group c = chunk c's tokens (as indices into `tokens`) over its prefix blocks
    chunks: frozenset[int]  # which of meta.chunks these are (the SDPA loop skips them)


@dataclass
class AmxChunks:
    """Every multi-token chunk of the step, for the CPU's causal chunk kernel on AMX tiles
    (kernels/cpu_decode_attention.py: chunk_attention), in meta.chunks order."""
    block_tables: torch.Tensor  # [chunks, max_blocks] int64
    q_starts: torch.Tensor  # [chunks] int64: each chunk's first token in the batch
    q_lens: torch.Tensor  # [chunks] int64
    positions: torch.Tensor  # [chunks] int64: each chunk's first position


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] flat slot (block * block_size + offset) of each new token
    num_single: int  # rows with one query token; they come first in the batch, shortest context first
    single_groups: list[SingleGroup] = field(default_factory=list)  # padding is per group, not per batch
    chunks: list[ChunkSegment] = field(default_factory=list)
    max_position: int = 0
    # Every row in batch order, for the Triton backend (attention_triton.py); None with the torch one.
    cu_seqlens_q: torch.Tensor | None = None  # [rows + 1] int32: row r owns tokens cu[r]:cu[r+1]
    context_lens: torch.Tensor | None = None  # [rows] int32: tokens in the cache, this step's included
    block_tables: torch.Tensor | None = None  # [rows, max_blocks] int32, padded with block 0
    max_q_len: int = 0
    max_context_len: int = 0
    # Masks built on first use in a step (a step whose chunks take the C++ kernels builds none):
    # (kind, group or chunk index, window) -> mask
    masks: dict = field(default_factory=dict)
    # Shared-prefix groups among the one-token rows (ModelRunner.prepare), None: no group pays.
    cascade: CascadeGroups | None = None
    # Chunks over long cached prefixes, as rows of the CPU cascade kernel (ModelRunner.prepare).
    prefix_chunks: PrefixChunks | None = None
    # Every chunk, for the CPU's AMX chunk kernel where it runs (then prefix_chunks is None).
    amx_chunks: AmxChunks | None = None


def _sdpa(q, k, v, mask, scale, causal=False):
    """q: [..., heads, q_len, d]; k, v: [..., kv_heads, kv_len, d]; grouped-query heads by broadcast."""
    if q.shape[-3] != k.shape[-3]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                                  enable_gqa=True)
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def _math_attention(q, k, v, mask, scale, softcap):
    """Softcapped attention. q: [..., kv_heads, rows, d] (rows: grouped heads or queries x heads);
    k, v: [..., kv_heads, kv_len, d]; mask: broadcastable to the scores, bool, True = attend."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., kv_heads, rows, kv_len]
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(v.dtype), v)


def _single_mask(g: SingleGroup, i: int, meta: AttentionMetadata, width: int, window: int, device):
    """[rows, 1, 1, width] bool of one-token rows: their context, cut to the last `window` keys."""
    key = ("single", i, window)
    if key not in meta.masks:
        j = torch.arange(width, device=device)
        ctx = g.ctx_lens.to(device) if g.ctx_lens is not None else g.mask.reshape(g.end - g.start, -1).sum(-1)
        keep = j[None, :] < ctx[:, None]
        if window:
            keep &= j[None, :] >= ctx[:, None] - window
        meta.masks[key] = keep[:, None, None, :]
    return meta.masks[key]


def _chunk_mask(c: ChunkSegment, i: int, meta: AttentionMetadata, window: int, device):
    """[q_len, ctx] bool of a chunk: causal, cut to each query's last `window` keys (window 0: none)."""
    key = ("chunk", i, window)
    if key not in meta.masks:
        pos = c.ctx_len - c.q_len + torch.arange(c.q_len, device=device)
        j = torch.arange(c.ctx_len, device=device)
        keep = j[None, :] <= pos[:, None]
        if window:
            keep &= j[None, :] > pos[:, None] - window
        meta.masks[key] = keep
    return meta.masks[key]


def _store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """The step's new K/V [tokens, kv_heads, d] into their cache slots (kernels/store_kv.py's
    semantics): one C++ call on CPU (a decode step's index_copy_ pair cost ~50 us a layer in
    dispatch alone), index_copy_ elsewhere."""
    if (k.device.type == "cpu" and k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == k.shape[2]
            and kv_cache.is_contiguous() and cpu_ops.load()):
        cpu_ops.store_kv(k, v, kv_cache, slots)
        return
    kv_heads, d = k.shape[1:]
    kv_cache[0].view(-1, kv_heads, d).index_copy_(0, slots, k)
    kv_cache[1].view(-1, kv_heads, d).index_copy_(0, slots, v)


def _put(out: torch.Tensor, g: SingleGroup, rows: torch.Tensor) -> torch.Tensor:
    """out with rows g.start:g.end set to `rows`: `rows` itself when the group is every token (a
    decode-only step: no copy)."""
    if g.start == 0 and g.end == out.shape[0]:
        return rows
    out[g.start:g.end] = rows
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]; returns [tokens, heads, d].
    window: sliding-window size (0: none); softcap: attention-logit softcap (0: none)."""
    _, num_blocks, block_size, kv_heads, d = kv_cache.shape
    heads = q.shape[1]
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _store_kv(k, v, kv_cache, meta.slot_mapping)
    out = torch.empty_like(q)

    def gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        # index_select over whole blocks as rows is a plain row copy: far faster on CPU than
        # advanced indexing of the 4-D cache.
        rows = cache.view(num_blocks, -1).index_select(0, blocks.reshape(-1))
        return rows.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, kv_heads, d)

    group = heads // kv_heads
    for i, g in enumerate(meta.single_groups):
        if g.ctx_lens is not None and meta.cascade is not None and not window and not softcap:
            c = meta.cascade  # one pass over each shared prefix per group (the cascade kernel has no window)
            out = _put(out, g, cascade_decode_attention_cpu(q[g.start:g.end], k_cache, v_cache, g.block_tables,
                                                            g.ctx_lens, scale, c.rows, c.starts, c.blocks))
            continue
        if g.ctx_lens is not None and not softcap:  # the C++ kernel reads K/V in place: no gathered copy
            out = _put(out, g, cpu_decode_attention(q[g.start:g.end], k_cache, v_cache, g.block_tables, g.ctx_lens,
                                                    scale, window))
            continue
        n = g.end - g.start
        keys = gather(k_cache, g.block_tables).transpose(1, 2)  # [n, kv_heads, ctx, d]
        vals = gather(v_cache, g.block_tables).transpose(1, 2)
        # The query heads of one KV head attend as a group: no K/V expansion needed.
        qs = q[g.start:g.end].view(n, kv_heads, group, d)  # [n, kv_heads, group, d]
        mask = g.mask if not (window or softcap) else _single_mask(g, i, meta, keys.shape[2], window, q.device)
        if softcap:
            o = _math_attention(qs, keys, vals, mask, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
        out[g.start:g.end] = o.view(n, heads, d)

    all_chunks_done = meta.amx_chunks is not None and not window and not softcap
    if all_chunks_done:
        a = meta.amx_chunks
        cpu_chunk_attention(q, k_cache, v_cache, a.block_tables, a.q_starts, a.q_lens, a.positions, scale, out)
    chunks_as_rows = meta.prefix_chunks is not None and not window and not softcap
    if chunks_as_rows:
        p = meta.prefix_chunks
        out[p.tokens] = cascade_decode_attention_cpu(q[p.tokens], k_cache, v_cache, p.block_tables, p.ctx_lens, scale,
                                                     p.groups.rows, p.groups.starts, p.groups.blocks)
    for i, c in enumerate(meta.chunks):
        if all_chunks_done or (chunks_as_rows and i in meta.prefix_chunks.chunks):
            continue
        keys = gather(k_cache, c.block_ids)[:c.ctx_len].transpose(0, 1)  # [kv_heads, ctx, d]
        vals = gather(v_cache, c.block_ids)[:c.ctx_len].transpose(0, 1)
        qc = q[c.q_start:c.q_start + c.q_len].transpose(0, 1)  # [heads, q_len, d]
        if softcap or (window and c.ctx_len > window):
            mask = _chunk_mask(c, i, meta, window, q.device)
            if softcap:  # queries of a KV head's group side by side: [kv_heads, group * q_len, d]
                qg = qc.reshape(kv_heads, group * c.q_len, d)
                o = _math_attention(qg, keys, vals, mask.repeat(group, 1), scale, softcap)
                out[c.q_start:c.q_start + c.q_len] = o.view(heads, c.q_len, d).transpose(0, 1)
            else:
                o = _sdpa(qc[None], keys[None], vals[None], mask, scale)[0]
                out[c.q_start:c.q_start + c.q_len] = o.transpose(0, 1)
            continue
        # 4-D ([1, heads, len, d]): with 3-D inputs torch's CPU SDPA takes the slow math path. A chunk
        # from position 0 is plainly causal; one over a cached prefix needs the mask.
        mask = _chunk_mask(c, i, meta, 0, q.device) if c.ctx_len > c.q_len else None
        o = _sdpa(qc[None], keys[None], vals[None], mask, scale, causal=mask is None)[0]
        out[c.q_start:c.q_start + c.q_len] = o.transpose(0, 1)
    return out
