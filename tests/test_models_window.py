"""Sliding-window attention (Mistral v0.1 style on every layer, Qwen2's layer_types on some): greedy
fp32 output equals HF `generate` with prompts far longer than the window, also with small prefill
chunks, preemption and prefix-cache hits."""

from __future__ import annotations

import pytest

from batchgen import LLM, SamplingParams
from batchgen.models.sliding_window import layer_windows
from tests.conftest import assert_greedy_match, hf_greedy
from tests.tiny_models import hf_model, make_tiny, prompts

MAX_NEW = 12


def _ours(model_dir, ps, windows=None, **engine):
    llm = LLM(model_dir, dtype="float32", **engine)
    if windows is not None:
        assert [layer.self_attn.window for layer in llm.engine.model.layers] == windows
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.mark.parametrize("arch,windows", [("mistral_window", [8, 8]), ("qwen2_window", [0, 12])])
def test_sliding_window_matches_hf(arch, windows, tmp_path, smol_dir):
    model_dir = make_tiny(tmp_path, smol_dir, arch)
    ps = prompts(6, seed=3, max_len=60) + [[5] * 30 + p for p in prompts(2, seed=4, max_len=20)]
    ps += [ps[0][:40] + p for p in prompts(2, seed=9, max_len=20)]  # shared prefixes hit the cache
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, ps, MAX_NEW, model=hf)
    for engine in (dict(), dict(max_num_batched_tokens=9), dict(num_kv_blocks=14, block_size=16, max_model_len=128)):
        ours, stats = _ours(model_dir, ps, windows, **engine)
        assert_greedy_match(model_dir, ps, ours, theirs, hf_model=hf)
        assert stats["cached_prompt_tokens"] > 0
        if "num_kv_blocks" in engine:
            assert stats["preemptions"] > 0


def test_layer_windows_from_configs():
    from transformers import MistralConfig, Qwen2Config

    assert layer_windows(MistralConfig(num_hidden_layers=3, sliding_window=None)) == [0, 0, 0]
    assert layer_windows(MistralConfig(num_hidden_layers=2, sliding_window=4096)) == [4096, 4096]
    assert layer_windows(Qwen2Config(num_hidden_layers=3, sliding_window=64)) == [0, 0, 0]  # use_sliding_window off
    assert layer_windows(Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=64,
                                     max_window_layers=1)) == [0, 64, 64]


def test_unsupported_architecture_lists_the_supported_ones():
    from types import SimpleNamespace

    from batchgen.models.registry import model_class

    with pytest.raises(ValueError, match=r"unsupported architecture \['FalconForCausalLM'\].*Qwen3MoeForCausalLM.*"
                                         r"Gemma3ForCausalLM.*Phi3ForCausalLM"):
        model_class(SimpleNamespace(architectures=["FalconForCausalLM"], model_type="falcon"))
