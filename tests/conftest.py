"""Shared fixtures: the embedded model, tiny random models of every supported architecture, HF oracles."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)

# name -> (transformers config class name, extra config)
TINY_ARCHS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
}


@pytest.fixture(scope="session")
def smol_dir() -> str:
    from batchgen.models.loader import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_dir):
    """Factory: a directory with a random tiny model of `arch` (and the embedded model's tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch in made:
            return made[arch]
        cls_name, extra = TINY_ARCHS[arch]
        config = getattr(transformers, cls_name)(**TINY, **extra)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # bigger weights than the default init: sharper, less tie-prone logits
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
                elif "bias" in name:
                    p.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(smol_dir).save_pretrained(path)
        made[arch] = str(path)
        return made[arch]

    return make


def save_random_model(config, tokenizer, path) -> str:
    """A randomly initialised HF model of `config`, saved with `tokenizer` under `path` (weights N(0, 0.08):
    sharper, less tie-prone logits than the default init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int, model=None,
              ignore_eos: bool = True) -> list[list[int]]:
    """The oracle: HF transformers `generate`, greedy, fp32, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = model.generation_config
    config.do_sample, config.pad_token_id = False, 0
    if ignore_eos:
        config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 generation_config=config)
        outs.append(gen[0, len(p):].tolist())
    return outs


def assert_bf16_greedy_match(hf_model, prompts, ours: list[list[int]], theirs: list[list[int]]) -> int:
    """Against HF bf16 `generate` (theirs, from hf_model): bf16 logits are coarse (one ulp is
    0.125-0.25 at the embedded model's logit sizes), so a divergence is accepted only where HF's own
    bf16 logits put our token within two ulps of its choice: a tie at bf16 precision, which round-off
    decides either way. Returns how many rows match token for token."""
    exact = 0
    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        if a == b:
            exact += 1
            continue
        k = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = hf_model(torch.tensor([list(prompt) + b[:k]])).logits[0, -1].float()
        ulp = 2.0 ** (torch.floor(torch.log2(logits.max().abs())) - 7)  # bf16: 8 significant bits
        assert logits[b[k]] - logits[a[k]] <= 2 * ulp, (
            f"prompt {i}: diverges at token {k} ({a[k]} vs HF {b[k]}), "
            f"{float(logits[b[k]] - logits[a[k]]):.3f} apart in HF's bf16 logits, more than two ulps")
    return exact


def assert_greedy_match(model_dir: str, prompts, ours: list[list[int]], theirs: list[list[int]], hf_model=None,
                        tie_gap: float = 1e-3) -> None:
    """Token-identical, except that a divergence is accepted where HF's top two logits are within
    tie_gap of each other and our token is the other one of them (fp32 round-off decides such ties
    either way)."""
    from transformers import AutoModelForCausalLM

    for i, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        if a == b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        hf_model = hf_model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf_model(torch.tensor([list(prompt) + b[:k]])).logits[0, -1]
        assert k < len(b), f"prompt {i}: we generated past HF's end: {a} vs {b}"
        assert k < len(a), f"prompt {i}: we stopped at {len(a)} tokens, HF went on: {a} vs {b}"
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < tie_gap, (f"prompt {i}: diverges at token {k} ({a[k:k+3]} vs HF {b[k:k+3]}) "
                               f"where HF's top-2 logit gap is {gap:.2e}, not a near-tie")
        assert float(logits[b[k]] - logits[a[k]]) < tie_gap, (
            f"prompt {i}: diverges at token {k} to {a[k]}, not HF's near-tied runner-up ({b[k]} is HF's choice)")
