"""Tiny random models of the architectures beyond the Llama family (MoE, Gemma, Phi-3), saved with
transformers' save_pretrained, and the HF oracle for them (eager attention: HF's SDPA path drops
Gemma's attention-logit softcapping)."""

from __future__ import annotations

import random

import torch

from tests.conftest import TINY

# name -> (transformers config class name, extra config)
ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
    "qwen3_moe_unnorm": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                norm_topk_prob=False, decoder_sparse_step=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False)),
    "mistral_window": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=12, max_window_layers=1,
                                         tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=16,
                                        sliding_window_pattern=3, rope_local_base_freq=10000.0, rope_theta=1e6,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0},
                                        final_logit_softcapping=4.0)),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5, tie_word_embeddings=False)),
    # longrope: rotary_dim 8 -> 4 factors; contexts past 32 switch a row to the long factors
    "phi3_longrope": ("Phi3Config", dict(partial_rotary_factor=0.5, original_max_position_embeddings=32,
                                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.0],
                                                       "long_factor": [1.5, 3.0, 6.0, 12.0]})),
}


def make_tiny(path, smol_dir: str, arch: str, **override) -> str:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, extra = ARCHS[arch]
    config = getattr(transformers, cls_name)(**{**TINY, **extra, **override})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # bigger weights than the default init: sharper, less tie-prone logits
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.5)
            elif "norm" in name:  # around each family's neutral value (1, or 0 for Gemma's 1 + w)
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(path)
    return str(path)


def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def prompts(n: int, seed: int, vocab: int = 512, max_len: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]
