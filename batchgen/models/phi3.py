"""Phi-3 over the flat token batch: the Llama decoder (models/llama.py) with three differences.

- The checkpoint stores q/k/v fused as `qkv_proj` and gate/up as `gate_up_proj`, already our fused
  layout: the loader splits them into the HF per-projection names the Llama loader expects.
- partial_rotary_factor: RoPE turns only the first rotary_dim = head_dim * factor dims of each
  head (rotate-half within those), the rest pass through.
- longrope (Phi-3 128k / Phi-3.5): inverse frequencies divided by the short or the long factors, cos
  and sin scaled by the attention factor. The choice is made per sequence, as HF `generate` makes it for
  one sequence: a row whose context (cached tokens plus this step's) exceeds
  original_max_position_embeddings uses the long factors, other rows the short ones, whatever the
  rest of the batch holds. Both tables sit in one [2 * max_len, rotary_dim] cos/sin pair; a token's
  row index is its position, plus max_len when its row is long. Two differences from HF `generate`:
  keys cached before a sequence crossed the limit keep their short-factor rotation (HF's Phi-3
  generate drops its cache at the crossing and recomputes it with the long factors), and a prompt
  longer than the limit prefilled in several chunks uses the short factors in the chunks that end
  before the limit (HF's single prefill uses the long ones). The choice is tensor ops on the attention
  metadata (no host sync), so Phi-3 decodes under CUDA graphs like the other models.
LoRA: PEFT adapters for Phi-3 target its fused `qkv_proj` / `gate_up_proj` (and `o_proj`,
`down_proj`); the adapter loader splits a fused B along its output into the per-target q/k/v and
gate/up pairs (batchgen/lora/adapters.py), which the fused projections here apply as Llama's do.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator

import torch

from batchgen.exec.attention import AttentionMetadata
from batchgen.models.llama import Attention, LlamaForCausalLM, rope_parameters


def _rotate_partial_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place on x [tokens, heads, head_dim]: rotate-half RoPE on the first rot dims; cos, sin [tokens, rot]."""
    rot = cos.shape[-1]
    xr = x[..., :rot]
    x1, x2 = xr[..., :rot // 2], xr[..., rot // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((-x2, x1), dim=-1)
    xr.copy_(xr * c + rotated * s)


class Phi3Attention(Attention):
    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden]; rope = (cos [tokens, rot], sin [tokens, rot]) already per token."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.lora is not None:
            qkv = self.lora(x, qkv, "qkv_proj")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [tokens, heads, head_dim]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        _rotate_partial_(q, *rope)
        _rotate_partial_(k, *rope)
        o = self.attention_fn(q, k, v, kv_cache, meta, self.scale, window=self.window, softcap=self.softcap)
        o = o.reshape(t, self.q_size)
        return self.o_proj(o) if self.lora is None else self.lora(o, self.o_proj(o), "o_proj")


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        # The Llama init builds a plain RoPE table it cannot for longrope: give it a default-RoPE view.
        plain = copy.copy(config)
        plain.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__init__(plain)
        self.config = config
        for layer in self.layers:  # the Llama attention with Phi-3's partial RoPE
            old = layer.self_attn
            new = Phi3Attention(config, qkv_bias=False, o_bias=False, qk_norm=False)
            new.window, new.softcap = old.window, old.softcap
            layer.self_attn = new
        theta, scaling = rope_parameters(config)
        scaling = dict(scaling or {})
        params = dict(getattr(config, "rope_parameters", None) or {})
        factor = (scaling.get("partial_rotary_factor") or params.get("partial_rotary_factor")
                  or getattr(config, "partial_rotary_factor", None) or 1.0)
        self.rotary_dim = int(self.head_dim * factor)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        # On the CPU even while the model is built on the meta device: tables are built on first use.
        base = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device="cpu").float() / self.rotary_dim))
        self.long_limit = 0  # 0: one table; else rows with a longer context use the long factors
        self.attention_factor = 1.0
        if kind == "longrope":
            orig = scaling.get("original_max_position_embeddings") or config.original_max_position_embeddings
            f = scaling.get("factor") or config.max_position_embeddings / orig
            self.attention_factor = scaling.get("attention_factor") or (
                1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(orig)))
            self.inv_freqs = (base / torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu"),
                              base / torch.tensor(scaling["long_factor"], dtype=torch.float32, device="cpu"))
            self.long_limit = int(orig)
        elif kind == "default":
            self.inv_freqs = (base,)
        else:
            raise ValueError(f"Phi-3 rope_scaling type {kind!r} is not supported (supported: default, longrope)")
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [tables * max_len, rot]
        self._table_len = 0

    def phi3_rope(self, max_len: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [len(inv_freqs) * table_len, rotary_dim] in fp32 as HF (scaled, then cast)."""
        if self._tables is None or self._table_len < max_len:
            self._table_len = max(max_len, 2 * (self._table_len or 1024))
            pos = torch.arange(self._table_len, device=like.device, dtype=torch.float32)
            cos, sin = [], []
            for inv_freq in self.inv_freqs:
                freqs = torch.outer(pos, inv_freq.to(like.device))
                emb = torch.cat((freqs, freqs), dim=-1)
                cos.append((emb.cos() * self.attention_factor).to(like.dtype))
                sin.append((emb.sin() * self.attention_factor).to(like.dtype))
            self._tables = (torch.cat(cos), torch.cat(sin))
        return self._tables

    def rope_tables(self, max_len: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the CUDA-graph capture builds ahead (the tables must not grow inside a capture)."""
        return self.phi3_rope(max_len, like)

    def _row_context(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[tokens]: the context length (cached + this step) of each token's row."""
        if meta.cu_seqlens_q is not None:  # the Triton backend's per-row fields: tensor ops only, no
            # host sync (output_size is known), so a decode step stays capturable in a CUDA graph
            lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
            return torch.repeat_interleave(meta.context_lens.long(), lens, output_size=positions.numel())
        ctx = positions + 1  # one-token rows: their own position + 1
        for c in meta.chunks:
            ctx[c.q_start:c.q_start + c.q_len] = c.ctx_len
        return ctx

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        cos, sin = self.phi3_rope(meta.max_position + 1, x)
        index = positions
        if self.long_limit:  # per row, on the device: the long table when its context passes the limit
            index = positions + (self._row_context(positions, meta) > self.long_limit).long() * self._table_len
        rope = (cos.index_select(0, index), sin.index_select(0, index))  # [tokens, rot] each
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x + residual

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Phi-3's fused qkv_proj / gate_up_proj as the per-projection names the Llama loader fuses back."""
        attn = self.layers[0].self_attn
        for name, tensor in weights:
            if name.endswith("self_attn.qkv_proj.weight"):
                q, k, v = tensor.split([attn.q_size, attn.kv_size, attn.kv_size])
                for part, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    yield name.replace("qkv_proj", part), t
            elif name.endswith("mlp.gate_up_proj.weight"):
                gate, up = tensor.chunk(2)
                yield name.replace("gate_up_proj", "gate_proj"), gate
                yield name.replace("gate_up_proj", "up_proj"), up
            else:
                yield name, tensor
