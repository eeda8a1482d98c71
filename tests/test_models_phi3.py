"""Phi-3: fused qkv_proj / gate_up_proj checkpoints, partial rotary, and longrope chosen per sequence;
greedy fp32 output equals HF `generate` (one sequence at a time), also with small prefill chunks,
preemption and prefix-cache hits."""

from __future__ import annotations

from batchgen import LLM, SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.tiny_models import hf_model, make_tiny, prompts

MAX_NEW = 10


def _ours(model_dir, ps, **engine):
    llm = LLM(model_dir, dtype="float32", **engine)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs], llm.stats()


def test_phi3_matches_hf(tmp_path, smol_dir):
    model_dir = make_tiny(tmp_path, smol_dir, "phi3")
    ps = prompts(5, seed=31, max_len=60) + [list(range(10, 50)) + p for p in prompts(2, seed=32, max_len=20)]
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, ps, MAX_NEW, model=hf)
    for engine in (dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=12, block_size=16, max_model_len=128)):
        ours, stats = _ours(model_dir, ps, **engine)
        assert_greedy_match(model_dir, ps, ours, theirs, hf_model=hf)
        assert stats["cached_prompt_tokens"] > 0
        if "num_kv_blocks" in engine:
            assert stats["preemptions"] > 0


def _hf_incremental(hf, prompt: list[int], n: int) -> list[int]:
    """HF's model stepped by hand with its KV cache, never recomputed: what HF `generate` does too,
    except that Phi-3's prepare_inputs_for_generation drops the cache and recomputes it with the long
    factors when a sequence first passes the limit. batchgen keeps the cache (recomputing every row
    that crosses would cost a full prefill), so its oracle for crossing rows is this one."""
    import torch

    out = []
    with torch.no_grad():
        o = hf(torch.tensor([prompt]), use_cache=True)
        for i in range(n):
            out.append(int(o.logits[0, -1].argmax()))
            o = hf(torch.tensor([[out[-1]]]), cache=o.past_key_values, use_cache=True,
                   position_ids=torch.tensor([[len(prompt) + i]]))
    return out


def test_phi3_longrope_per_sequence(tmp_path, smol_dir):
    """One batch with rows below the 32-token limit, rows above it from the prompt on, and rows that
    cross it while decoding: each row uses its own factors, whatever the rest of the batch holds."""
    model_dir = make_tiny(tmp_path, smol_dir, "phi3_longrope")
    short = prompts(3, seed=41, max_len=15)  # stay below 32 with 10 new tokens
    long = [p for p in prompts(6, seed=42, max_len=70) if len(p) > 33][:3]  # long from the prompt on
    crossing = [list(range(60, 88)), list(range(100, 126))]  # 28 and 26 tokens: cross while decoding
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, short + long, MAX_NEW, model=hf)
    theirs += [_hf_incremental(hf, p, MAX_NEW) for p in crossing]
    ours, _ = _ours(model_dir, short + long + crossing)
    assert_greedy_match(model_dir, short + long + crossing, ours, theirs, hf_model=hf)
    # the factors matter: with the short factors everywhere the long rows come out differently
    hf.model.rotary_emb.long_inv_freq = hf.model.rotary_emb.original_inv_freq
    assert hf_greedy(model_dir, long, MAX_NEW, model=hf) != theirs[3:6]
