"""Gemma 2 and Gemma 3 (text) over the flat token batch, on the Llama family's pieces.

What differs from Llama (models/llama.py), all as HF computes it:
- RMSNorm scales by (1 + w), all in fp32, rounding once at the end; four norms per layer (before and
  after attention, before and after the MLP), the residual added after the post-norms.
- The embedding is scaled by sqrt(hidden), that factor rounded to the model dtype first.
- GeGLU MLP with tanh-approximated gelu; tied embeddings (the LM head is the embedding).
- Attention scale query_pre_attn_scalar ** -0.5; sliding-window layers interleaved with global ones
  (`layer_types`, or Gemma 3's sliding_window_pattern); Gemma 2 softcaps attention logits
  (attn_logit_softcapping) and both cap the final logits (final_logit_softcapping).
- Gemma 3: q/k RMSNorm per head, and two RoPE tables: local layers use rope_local_base_freq,
  global ones rope_theta with rope_scaling (transformers 5 keeps both in rope_parameters by layer type).
Gemma3ForConditionalGeneration checkpoints load their language model (`language_model.` keys); the
vision tower is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.exec.attention import AttentionMetadata
from batchgen.models.llama import MLP, Attention, LlamaForCausalLM, rope_inv_freq
from batchgen.models.sliding_window import layer_windows


class GemmaRMSNorm(nn.Module):
    """out = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, rounded to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class GeGLU(MLP):
    """The Llama MLP (fused gate/up, LoRA hooks) with gelu(tanh) in place of SiLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.lora is not None:
            gate_up = self.lora(x, gate_up, "gate_up_proj")
        gate, up = gate_up.split(self.intermediate, dim=-1)
        h = F.gelu(gate, approximate="tanh") * up  # [tokens, intermediate]
        return self.down_proj(h) if self.lora is None else self.lora(h, self.down_proj(h), "down_proj")


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool, window: int, rope_kind: str):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, bool(getattr(config, "attention_bias", False)),
                                   bool(getattr(config, "attention_bias", False)), qk_norm=False)
        attn = self.self_attn
        attn.scale = float(config.query_pre_attn_scalar) ** -0.5
        attn.window = window
        attn.softcap = float(getattr(config, "attn_logit_softcapping", None) or 0.0)
        if qk_norm:  # Gemma's (1 + w) norm on each head
            attn.qk_norm = True
            attn.q_norm = GemmaRMSNorm(attn.head_dim, eps)
            attn.k_norm = GemmaRMSNorm(attn.head_dim, eps)
        self.mlp = GeGLU(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.rope_kind = rope_kind  # which RoPE table: "sliding_attention" or "full_attention"

    def forward(self, x, rope, kv_cache, meta):
        """x: the residual stream [tokens, hidden]; returns it after this layer."""
        h = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


def gemma_rope(config) -> dict[str, tuple[float, dict | None]]:
    """Per layer type: (theta, scaling) from a transformers 5 `rope_parameters` (flat for Gemma 2,
    keyed by layer type for Gemma 3), or from v4 fields (rope_theta, rope_scaling, rope_local_base_freq)."""
    params = getattr(config, "rope_parameters", None) or {}
    out = {}
    for kind in ("sliding_attention", "full_attention"):
        p = dict(params.get(kind, params) if isinstance(params.get(kind, params), dict) else {})
        if not p:  # v4 config
            if kind == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
                p = {"rope_theta": config.rope_local_base_freq}
            else:
                p = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
        theta = float(p.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
        kind_name = p.get("rope_type", p.get("type", "default"))
        out[kind] = (theta, None if kind_name == "default" else p)
    return out


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2; Gemma3ForCausalLM adds q/k norms and the local RoPE table."""

    qk_norm = False
    lora_mlp = True

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        windows = layer_windows(config)
        types = ["sliding_attention" if w else "full_attention" for w in windows]
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, self.qk_norm, w, t) for w, t in zip(windows, types))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        attn = self.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.tied_head_packed = None
        self.final_softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
        ropes = gemma_rope(config)
        if not self.qk_norm:  # Gemma 2: one RoPE table for every layer
            ropes["sliding_attention"] = ropes["full_attention"]
        self.inv_freqs = {kind: rope_inv_freq(self.head_dim, *ropes[kind]) for kind in set(types)}
        self._rope_caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.embed_scale = float(config.hidden_size) ** 0.5

    def rope_tables(self, max_len: int, like: torch.Tensor, kind: str = "full_attention"):
        """cos/sin [positions, head_dim] of one layer type's table (the Llama code, per table)."""
        self.inv_freq, self._rope_cache = self.inv_freqs[kind], self._rope_caches.get(kind)
        self._rope_caches[kind] = LlamaForCausalLM.rope_tables(self, max_len, like)
        return self._rope_caches[kind]

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [tokens]; returns hidden states [tokens, hidden] before the final norm."""
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # the factor in the model dtype, as HF
        ropes = {kind: (*self.rope_tables(meta.max_position + 1, x, kind), positions) for kind in self.inv_freqs}
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, ropes[layer.rope_kind], kv_cache, meta)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_language_model(weights))


def _language_model(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Gemma3ForConditionalGeneration keys (`language_model.model.*` on the hub, `model.language_model.*`
    from transformers 5) as a text model's `model.*`; the vision tower and projector are skipped."""
    for name, tensor in weights:
        if "vision_tower." in name or "multi_modal_projector." in name:
            continue
        for prefix in ("language_model.model.", "model.language_model.", "language_model."):
            if name.startswith(prefix):
                name = "model." + name.removeprefix(prefix)
                break
        yield name, tensor


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
