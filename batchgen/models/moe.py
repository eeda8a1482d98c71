"""Mixture-of-experts models: Qwen3-MoE, Mixtral and Qwen2-MoE.

The decoder is the Llama family's (models/llama.py: attention, RMSNorm, RoPE, dense MLP); only the
MLP of the sparse layers changes to `SparseMoE`: a router (softmax in fp32, top-k, renormalized
where the model does), the experts' weights stacked at load ([E, 2I, H] gate+up and [E, H, I] down),
and the tokens' picks sorted by expert. On CPU all experts run in one C++ call (kernels/cpu_moe.py:
sort, both GEMMs, SiLU * up and the weighted sum; weights repacked into its panels on first use), or,
where oneDNN packs bf16 (AVX512-BF16 / AMX), each expert's rows as one packed GEMM pair; without the
C++ kernel, one torch GEMM pair per expert. On CUDA one grouped Triton GEMM (kernels/fused_moe.py).
Qwen2-MoE adds a shared expert behind a sigmoid gate.

Checkpoints come with per-expert keys (HF hub files and transformers' save_pretrained both write
`mlp.experts.{j}.gate_proj/up_proj/down_proj`, Mixtral `block_sparse_moe.experts.{j}.w1/w3/w2`), or
with the experts already stacked (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
[E, H, I], transformers' in-memory layout). The loader stacks the per-expert tensors of a layer
once all of them have arrived, so it holds at most the experts of the layers in flight.

LoRA: adapters apply to the attention projections only (`lora_mlp = False`); the LoRA loader refuses
MLP targets for these models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from batchgen.kernels import cpu_moe
from batchgen.kernels.fused_moe import fused_moe_torch
from batchgen.models import fused
from batchgen.models.llama import LlamaForCausalLM
from batchgen.models.packed_linear import pack_weight, packed_linear


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [tokens, experts] -> (weights [tokens, k] fp32, ids [tokens, k] int64), as HF:
    softmax in fp32, top-k, optionally renormalized to sum to one."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """The sparse MLP: router + stacked SiLU-gated experts (+ Qwen2-MoE's gated shared expert)."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, renormalize: bool,
                 shared_inter: int = 0, round_weights: bool = False):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.inter = num_experts, top_k, renormalize, inter
        self.round_weights = round_weights  # Qwen3/Qwen2-MoE round the routed weights to the model dtype
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]: gate rows, then up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))  # [E, H, I]
        self.shared_inter = shared_inter
        if shared_inter:
            self.shared_gate_up = nn.Linear(hidden, 2 * shared_inter, bias=False)
            self.shared_down = nn.Linear(shared_inter, hidden, bias=False)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # oneDNN copies per expert
        self.panels: tuple[torch.Tensor, torch.Tensor] | None = None  # the C++ kernel's layout (cpu_moe)
        self.lora = None  # set by the LoRA attach; never used: LoRA does not reach the experts

    def pack_for_cpu(self) -> None:
        """Pack each expert's two weights for oneDNN and drop the dense stacks (bf16 CPU). fp32 experts
        (packable on non-Intel CPUs, packed_linear.can_pack) stay for the C++ kernel, which beat
        oneDNN's per-expert GEMMs there; the shared expert's and router's nn.Linear are packed anyway."""
        if self.w13.dtype != torch.bfloat16:
            return
        if self.panels is not None:
            raise RuntimeError("SparseMoE.pack_for_cpu: the C++ kernel already repacked these experts (call it "
                               "before the first forward, as the engine does)")
        self.packed = ([pack_weight(w) for w in self.w13.data], [pack_weight(w) for w in self.w2.data])
        self.w13 = nn.Parameter(torch.empty(0, dtype=self.w13.dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(0, dtype=self.w2.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] -> [tokens, hidden]."""
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)  # [tokens, k] each
        if self.round_weights:
            weights = weights.to(x.dtype).float()
        out = self.experts(x, weights, ids)
        if self.shared_inter:
            shared = self.shared_down(fused.silu_mul(self.shared_gate_up(x)))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from batchgen.kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids)
        if self.packed is None and x.dtype in cpu_moe.SUPPORTED_DTYPES and cpu_moe.load() is not None:
            if self.panels is None:  # first CPU forward: repack, and drop the dense stacks
                self.panels = cpu_moe.pack_experts(self.w13.data, self.w2.data)
                self.w13 = nn.Parameter(torch.empty(0, dtype=self.w13.dtype), requires_grad=False)
                self.w2 = nn.Parameter(torch.empty(0, dtype=self.w2.dtype), requires_grad=False)
            return cpu_moe.moe_experts(x, *self.panels, weights, ids)
        if self.packed is not None:
            w13, w2 = self.packed
            return fused_moe_torch(x, weights, ids, self.num_experts, lambda e, r: packed_linear(r, w13[e]),
                                   lambda e, h: packed_linear(h, w2[e]), fused.silu_mul)
        return fused_moe_torch(x, weights, ids, self.num_experts, lambda e, r: F.linear(r, self.w13[e]),
                               lambda e, h: F.linear(h, self.w2[e]), fused.silu_mul)


# Checkpoint names of one expert's weights -> (our stacked parameter, gate/up half or None)
_EXPERT = re.compile(r"^(.*\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_PART = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
         "down_proj": ("w2", None), "w2": ("w2", None)}
_SHARED = re.compile(r"^(.*\.mlp\.)shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")


class MoEForCausalLM(LlamaForCausalLM):
    """The Llama decoder with SparseMoE MLPs on the sparse layers."""

    lora_mlp = False  # LoRA reaches the attention projections only
    renormalize_always = False  # Mixtral renormalizes the top-k weights whatever the config says
    round_weights = False

    def __init__(self, config):
        super().__init__(config)
        self.num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        renormalize = self.renormalize_always or bool(getattr(config, "norm_topk_prob", False))
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        self.sparse_layers = [i for i in range(config.num_hidden_layers)
                              if i not in dense and self.num_experts > 0 and (i + 1) % step == 0]
        for i in self.sparse_layers:
            self.layers[i].mlp = SparseMoE(config.hidden_size, inter, self.num_experts, config.num_experts_per_tok,
                                           renormalize, getattr(config, "shared_expert_intermediate_size", 0) or 0,
                                           self.round_weights)
        self.expert_inter = inter

    def pack_for_cpu(self) -> None:
        super().pack_for_cpu()
        for i in self.sparse_layers:
            self.layers[i].mlp.pack_for_cpu()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._stack_experts(weights))

    def _stack_experts(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Rename the MoE tensors to ours and stack per-expert ones; pass everything else through."""
        E, inter = self.num_experts, self.expert_inter
        pending: dict[str, dict] = {}  # our stacked name -> {(expert, half): tensor}
        shared: dict[str, dict] = {}
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            if name.endswith(".mlp.experts.gate_up_proj"):  # already stacked: [E, 2I, H]
                yield name.removesuffix("experts.gate_up_proj") + "w13", tensor
                continue
            if name.endswith(".mlp.experts.down_proj"):  # [E, H, I]
                yield name.removesuffix("experts.down_proj") + "w2", tensor
                continue
            m = _EXPERT.match(name)
            if m is not None:
                prefix, expert, part = m[1], int(m[2]), m[3]
                ours, half = _PART[part]
                key = f"{prefix}mlp.{ours}"
                got = pending.setdefault(key, {})
                if (expert, half) in got:
                    raise ValueError(f"checkpoint tensor {name!r} appears twice")
                if expert >= E:
                    raise ValueError(f"checkpoint tensor {name!r}: expert {expert}, but the config has {E} experts")
                got[(expert, half)] = tensor
                if len(got) == E * (2 if ours == "w13" else 1):
                    del pending[key]
                    if ours == "w13":
                        yield key, torch.stack([torch.cat([got[(j, 0)], got[(j, 1)]]) for j in range(E)])
                    else:
                        yield key, torch.stack([got[(j, None)] for j in range(E)])
                continue
            m = _SHARED.match(name)
            if m is not None:
                if m[2] == "down_proj":
                    yield m[1] + "shared_down.weight", tensor
                    continue
                got = shared.setdefault(m[1], {})
                got[m[2]] = tensor
                if len(got) == 2:
                    del shared[m[1]]
                    yield m[1] + "shared_gate_up.weight", torch.cat([got["gate_proj"], got["up_proj"]])
                continue
            yield name, tensor
        if pending or shared:
            some = sorted(pending) + sorted(shared)
            raise ValueError(f"checkpoint is missing expert tensors for {some[:5]} (of {E} experts, "
                             f"intermediate size {inter})")


class Qwen3MoeForCausalLM(MoEForCausalLM):
    qk_norm = True
    round_weights = True


class Qwen2MoeForCausalLM(MoEForCausalLM):
    qkv_bias = True
    round_weights = True


class MixtralForCausalLM(MoEForCausalLM):
    renormalize_always = True
