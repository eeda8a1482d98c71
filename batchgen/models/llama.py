"""The Llama family (Llama, Mistral, Qwen2, Qwen3) over a flat, unpadded token batch.

One implementation, switched by config flags: Qwen2 adds a q/k/v bias, Qwen3 an RMSNorm on each
query/key head. q/k/v and gate/up are fused into one GEMM each, the layout the matmul wants; the
loader splits HF checkpoints into those fused weights. The residual add rides along with the next
RMSNorm, and RMSNorm, RoPE and SiLU-and-mul run as fused kernels (batchgen/models/fused.py).
Numerics follow HF (RMSNorm statistics in fp32, RoPE tables in fp32) so greedy outputs match HF
`generate` token for token in fp32. On CPUs with AMX tiles, decode-only steps run the same kernels
for all layers from one C++ call (kernels/cpu_decoder.py, bound at pack_for_cpu): same bits, without
the Python between the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.exec.attention import AttentionMetadata, paged_attention
from batchgen.kernels import cpu_decoder
from batchgen.models import fused
from batchgen.models.packed_linear import PackedGateUp, PackedLinear, pack_linears
from batchgen.models.sliding_window import layer_windows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [tokens, dim] -> norm(x), or with a residual (norm(x + residual), x + residual)."""
        return fused.rms_norm(x, self.weight, self.eps, residual)


def rope_parameters(config) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers config, v4 (`rope_theta` + `rope_scaling`) or v5 (`rope_parameters`)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        return float(theta), (None if kind == "default" else params)
    scaling = getattr(config, "rope_scaling", None)
    return float(getattr(config, "rope_theta", 10000.0)), (dict(scaling) if scaling else None)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class Attention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        self.lora = None  # batchgen.lora.layers.LayerLoRA when adapters are loaded: y = lora(x, y, projection)
        self.attention_fn = paged_attention  # the attention backend; the engine may swap in Triton's
        self.window = 0  # sliding-window size of this layer (0: full attention); set by the model
        self.softcap = 0.0  # attention-logit softcap (Gemma 2; 0: none); set by the model
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kv_cache,
                meta: AttentionMetadata) -> torch.Tensor:
        """x [tokens, hidden]; rope = (cos table, sin table, positions [tokens])."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.lora is not None:
            qkv = self.lora(x, qkv, "qkv_proj")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [tokens, heads, head_dim]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [tokens, kv_heads, head_dim]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # per head: [tokens * heads, head_dim] rows
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(t, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(t, self.num_kv_heads, self.head_dim)
        fused.rotary_(q, k, *rope)  # in place: q and k are views of this step's fresh qkv
        o = self.attention_fn(q, k, v, kv_cache, meta, self.scale, window=self.window,
                              softcap=self.softcap)  # [tokens, heads, head_dim]
        o = o.reshape(t, self.q_size)
        return self.o_proj(o) if self.lora is None else self.lora(o, self.o_proj(o), "o_proj")


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=bias)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=bias)
        self.lora = None  # batchgen.lora.layers.LayerLoRA when adapters are loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is None and isinstance(self.gate_up_proj, PackedGateUp):
            h = self.gate_up_proj.silu_mul(x)  # [tokens, intermediate]: the SiLU runs in the GEMM's epilogue
        else:
            gate_up = self.gate_up_proj(x)
            if self.lora is not None:
                gate_up = self.lora(x, gate_up, "gate_up_proj")
            h = fused.silu_mul(gate_up)  # [tokens, intermediate]
        return self.down_proj(h) if self.lora is None else self.lora(h, self.down_proj(h), "down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qkv_bias, o_bias, qk_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, rope, kv_cache, meta):
        """Returns (this layer's MLP output, the residual stream before it); their sum is HF's hidden state."""
        if residual is None:  # first layer: the embedding is the residual stream
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Llama, and by flags Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm)."""

    qkv_bias = False  # always a q/k/v bias (Qwen2); else config.attention_bias decides for q/k/v/o
    qk_norm = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias, o_bias = (True, False) if self.qkv_bias else (attention_bias, attention_bias)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, o_bias, self.qk_norm)
                                    for _ in range(config.num_hidden_layers))
        for layer, window in zip(self.layers, layer_windows(config)):
            layer.self_attn.window = window
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        attn = self.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.tied_head_packed: PackedLinear | None = None  # the LM head's packed copy of the embedding (pack_for_cpu)
        self.cpu_decoder = None  # kernels/cpu_decoder.py's stack: a decode step's layers in one C++ call (pack_for_cpu)
        # Not a buffer: tables are built on first use, in fp32, on the device of the weights.
        self.inv_freq = rope_inv_freq(self.head_dim, *rope_parameters(config))  # [head_dim / 2]
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope_tables(self, max_len: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [positions, head_dim] up to max_len, computed in fp32 as HF does, then cast."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < max_len:
            max_len = max(max_len, 2 * (self._rope_cache[0].shape[0] if self._rope_cache else 1024))
            pos = torch.arange(max_len, device=like.device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(like.device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = (emb.cos().to(like.dtype), emb.sin().to(like.dtype))
        return self._rope_cache

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [tokens]; returns hidden states [tokens, hidden] before the final norm."""
        x = self.embed_tokens(input_ids)  # [tokens, hidden]
        rope = (*self.rope_tables(meta.max_position + 1, x), positions)
        if self.cpu_decoder is not None and self._decode_in_one_call(meta):
            g, c = meta.single_groups[0], meta.cascade
            return self.cpu_decoder.forward(x, *rope, meta.slot_mapping, g.block_tables, g.ctx_lens, kv_caches,
                                            [] if c is None else [c.rows, c.starts, c.blocks])
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x + residual

    def _decode_in_one_call(self, meta: AttentionMetadata) -> bool:
        """Whether this step is one the C++ stack runs as the layers would: one token per row, all
        through the CPU decode kernel (one group, in place), and no LoRA adapter on the layers."""
        attn = self.layers[0].self_attn
        return (not meta.chunks and len(meta.single_groups) == 1 and meta.single_groups[0].ctx_lens is not None
                and attn.lora is None and attn.attention_fn is paged_attention)

    def _cpu_decoder_stack(self):
        """The C++ decode stack over these layers (kernels/cpu_decoder.py) where each is a plain
        Llama layer (no q/k norm or softcap) with every projection on the AMX kernel; else None."""
        def plain(layer) -> bool:
            a, m = layer.self_attn, layer.mlp
            return (type(layer) is DecoderLayer and type(a) is Attention and type(m) is MLP and not a.qk_norm
                    and not a.softcap and isinstance(m.gate_up_proj, PackedGateUp)
                    and all(type(p) is PackedLinear and p.backend == "amx" for p in (a.qkv_proj, a.o_proj, m.down_proj)))

        if not all(plain(layer) for layer in self.layers):
            return None
        weights, biases = [], []
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            weights += [layer.input_layernorm.weight.data, a.qkv_proj.packed, a.o_proj.packed,
                        layer.post_attention_layernorm.weight.data, m.gate_up_proj.packed, m.down_proj.packed]
            biases += [a.qkv_proj.bias, a.o_proj.bias, m.gate_up_proj.bias, m.down_proj.bias]
        a, windows = self.layers[0].self_attn, [layer.self_attn.window for layer in self.layers]
        return cpu_decoder.decoder_stack(weights, biases, windows, a.num_heads, a.num_kv_heads, a.head_dim,
                                         self.layers[0].mlp.gate_up_proj.inter, self.layers[0].input_layernorm.eps,
                                         a.scale)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [rows, hidden] -> logits [rows, vocab] in the model's dtype (callers upcast if they need)."""
        h = self.norm(hidden)
        if not self.tie_word_embeddings:
            return self.lm_head(h)
        if self.tied_head_packed is not None:
            return self.tied_head_packed(h)
        return F.linear(h, self.embed_tokens.weight)

    def pack_for_cpu(self) -> None:
        """Pre-pack every projection and the LM head for the CPU GEMM (see packed_linear.py).
        A tied LM head gets its own packed copy: the embedding lookup still needs the dense table."""
        pack_linears(self)
        if self.tie_word_embeddings:
            self.tied_head_packed = PackedLinear(self.embed_tokens.weight)
        self.cpu_decoder = self._cpu_decoder_stack()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused layout; every parameter must be filled exactly once."""
        params = dict(self.named_parameters())
        fused_parts = {  # HF name part -> (our name part, shard index)
            "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
        }
        attn = self.layers[0].self_attn
        qkv_sizes = [attn.q_size, attn.kv_size, attn.kv_size]  # this rank's under tensor parallelism
        filled: dict[str, int] = {}
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            parts = name.split(".")
            shard = None
            for i, part in enumerate(parts):
                if part in fused_parts:
                    parts[i], shard = fused_parts[part]
                    fused_part = parts[i]
            name = ".".join(parts)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            param = params[name]
            if shard is None:
                target = param.data
            else:
                # gate/up: halves of the parameter (a layer's own size: MoE models mix dense and sparse layers)
                sizes = qkv_sizes if fused_part == "qkv_proj" else [param.shape[0] // 2] * 2
                start = sum(sizes[:shard])
                target = param.data.narrow(0, start, sizes[shard])
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.copy_(tensor)
            filled[name] = filled.get(name, 0) + 1
        expected = {n: (3 if "qkv_proj" in n else 2 if "gate_up_proj" in n else 1) for n in params}
        missing = sorted(n for n, k in expected.items() if filled.get(n, 0) != k)
        if missing:
            raise ValueError(f"checkpoint is missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
