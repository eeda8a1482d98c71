"""Attention over the paged KV cache, Triton backend (CUDA; on CPU only under TRITON_INTERPRET=1).

Same call as the torch backend (`batchgen.exec.attention.paged_attention`): the step's new K/V go
into the cache with `batchgen.kernels.store_kv`, then one `batchgen.kernels.paged_attention` call serves the whole
mixed batch (split-K for one-token rows, tiled online softmax for chunks). It reads the per-row
fields of AttentionMetadata (cu_seqlens_q, context_lens, block_tables), which ModelRunner.prepare
fills when its attention_backend is "triton".

Importing this module imports triton and builds the kernels: import it only once the backend is chosen.
"""

from __future__ import annotations

import torch

from batchgen.exec.attention import AttentionMetadata
from batchgen.kernels._utils import interpreted as _interpreted
from batchgen.kernels.cascade_attention import cascade_decode_attention_triton
from batchgen.kernels.paged_attention import _decode_kernel
from batchgen.kernels.paged_attention import paged_attention as _paged_attention
from batchgen.kernels.store_kv import store_kv


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _interpreted(_decode_kernel)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]; returns [tokens, heads, d].
    window: sliding-window size (0: none); softcap: attention-logit softcap (0: none)."""
    if meta.cu_seqlens_q is None:
        raise ValueError("the Triton attention backend needs cu_seqlens_q / context_lens / block_tables in "
                         "AttentionMetadata: set ModelRunner.attention_backend = 'triton'")
    store_kv(k, v, kv_cache, meta.slot_mapping)
    if meta.cascade is not None and meta.num_single > 0:
        return _cascade_then_chunks(q, kv_cache, meta, scale)
    return _paged_attention(q, kv_cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, scale,
                            max_q_len=meta.max_q_len or None, max_context_len=meta.max_context_len or None,
                            has_decode=meta.num_single > 0, window=window, softcap=softcap)


def _cascade_then_chunks(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float):
    """The one-token rows (first n tokens, one per row) through cascade attention, then the
    multi-token rows after them through paged_attention alone."""
    n, c = meta.num_single, meta.cascade
    out = torch.empty_like(q)
    cascade_decode_attention_triton(q[:n], kv_cache, meta.block_tables[:n], meta.context_lens[:n], scale, c.rows,
                                    c.starts, c.blocks, max_group_rows=c.max_rows, out=out[:n])
    if q.shape[0] > n:
        _paged_attention(q[n:], kv_cache, meta.cu_seqlens_q[n:] - n, meta.context_lens[n:], meta.block_tables[n:],
                         scale, max_q_len=meta.max_q_len or None, max_context_len=meta.max_context_len or None,
                         has_decode=False, out=out[n:])
    return out


def use_triton_attention(model: torch.nn.Module) -> None:
    """Route every attention layer of `model` (those with an `attention_fn`) to this backend."""
    for module in model.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = paged_attention
