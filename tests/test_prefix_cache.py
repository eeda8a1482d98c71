"""The radix prefix cache changes how much is computed, never what is generated."""

from __future__ import annotations

import random

import pytest

from batchgen import LLM, SamplingParams


def _shared_prefix_prompts(seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 512) for _ in range(rng.randint(20, 60))] for _ in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 20))] for i in range(18)]
    rng.shuffle(prompts)
    return prompts


def _run(model_dir, prompts, **engine):
    llm = LLM(model_dir, dtype="float32", **engine)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs], llm.stats()


@pytest.mark.parametrize("engine", [
    dict(),  # a roomy pool
    dict(num_kv_blocks=16, max_model_len=96, max_num_seqs=4),  # evicts cached blocks to make room
    dict(num_kv_blocks=10, max_model_len=80),  # preempts, then recomputes through the cache
], ids=["roomy", "evicting", "preempting"])
def test_cache_on_equals_cache_off(engine, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = _shared_prefix_prompts()
    off, off_cached, off_stats = _run(model_dir, prompts, enable_prefix_caching=False, **engine)
    on, on_cached, on_stats = _run(model_dir, prompts, **engine)
    assert on == off
    assert sum(off_cached) == 0 and off_stats["prefix_cache_hit_rate"] == 0
    assert on_stats["prefix_cache_hit_rate"] > 0.3
    assert on_stats["computed_prompt_tokens"] < off_stats["computed_prompt_tokens"]
    assert on_stats["kv_blocks_free"] == on_stats["kv_blocks"]  # cached blocks count as free
    if "num_kv_blocks" in engine and engine["num_kv_blocks"] == 10:
        assert on_stats["preemptions"] > 0


def test_same_step_rows_share_one_prefix_computation(tiny_model_dir):
    """Rows that arrive together with an uncached common prefix: one computes it, the others follow
    and hit the cache, so the prefix is computed once, not once per row."""
    rng = random.Random(5)
    system = [rng.randrange(3, 512) for _ in range(64)]  # 4 full blocks
    prompts = [system + [rng.randrange(3, 512) for _ in range(5)] for _ in range(6)]
    _, cached, stats = _run(tiny_model_dir("llama"), prompts)
    assert sorted(cached) == [0] + [64] * 5
    assert stats["computed_prompt_tokens"] == 64 + 6 * 5
