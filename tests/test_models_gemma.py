"""Gemma 2 and Gemma 3 (text): greedy fp32 output equals HF `generate` (eager attention: HF's SDPA
path drops the attention-logit softcap), with prompts longer than the sliding window, small prefill
chunks, preemption and prefix-cache hits; Gemma3ForConditionalGeneration checkpoints load their
language model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from batchgen import LLM, SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.tiny_models import hf_model, make_tiny, prompts

MAX_NEW = 10


def _ours(model_dir, ps, **engine):
    llm = LLM(model_dir, dtype="float32", **engine)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs], llm.stats(), llm


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory, smol_dir):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = make_tiny(tmp_path_factory.mktemp(arch), smol_dir, arch)
        return made[arch]
    return make


@pytest.mark.parametrize("arch,windows", [("gemma2", [8, 0]), ("gemma3", [8, 8, 0])])
def test_gemma_matches_hf(arch, windows, gemma_dirs):
    model_dir = gemma_dirs(arch)
    ps = prompts(5, seed=21, max_len=50)
    ps += [list(range(10, 50)) + p for p in prompts(2, seed=22, max_len=20)]  # a shared prefix hits the cache
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, ps, MAX_NEW, model=hf)
    ngram = dict(speculative=dict(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3))
    for engine in (dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=12, block_size=16, max_model_len=128),
                   ngram):
        ours, stats, llm = _ours(model_dir, ps, **engine)
        assert [layer.self_attn.window for layer in llm.engine.model.layers] == windows
        assert_greedy_match(model_dir, ps, ours, theirs, hf_model=hf)
        assert stats["cached_prompt_tokens"] > 0
        if "num_kv_blocks" in engine:
            assert stats["preemptions"] > 0


def test_gemma2_logprobs_match_hf_with_softcaps(gemma_dirs):
    """Final-logit softcapping never changes a greedy choice, so check the logprobs: ours equal HF's
    (caps on), and differ from HF's with the caps off."""
    model_dir = gemma_dirs("gemma2")
    hf = hf_model(model_dir)
    prompt = prompts(1, seed=3, max_len=30)[0]
    llm = LLM(model_dir, dtype="float32")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    ours = out.outputs[0].logprobs[0]
    with torch.no_grad():
        capped = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        hf.config.final_logit_softcapping = None
        for layer in hf.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    for token, lp in ours.items():
        assert abs(lp - float(capped[token])) < 1e-4
    assert max(abs(lp - float(uncapped[t])) for t, lp in ours.items()) > 1e-2


def test_gemma3_conditional_generation_checkpoint(gemma_dirs, tmp_path):
    """A Gemma3ForConditionalGeneration directory (text_config, `language_model.model.*` keys, a
    vision tower) generates as its text model does."""
    from safetensors.torch import load_file, save_file

    text_dir = gemma_dirs("gemma3")
    mm = tmp_path / "mm"
    shutil.copytree(text_dir, mm)
    text_cfg = json.loads((mm / "config.json").read_text())
    text_cfg.pop("architectures")
    (mm / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                "model_type": "gemma3", "text_config": text_cfg,
                                                "vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                                                  "patch_size": 14, "image_size": 28}}))
    state = {"language_model." + k: v for k, v in load_file(mm / "model.safetensors").items()}
    state["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(32, 3, 14, 14)
    (mm / "model.safetensors").unlink()
    save_file(state, mm / "model.safetensors", metadata={"format": "pt"})
    ps = prompts(3, seed=4, max_len=30)
    assert _ours(str(mm), ps)[0] == _ours(text_dir, ps)[0]
