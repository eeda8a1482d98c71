"""prompt_logprobs against log_softmax of HF's forward (fp32), whole prompts and small chunks,
with a cached shared prefix (recomputed, not reused) and with preemption."""

from __future__ import annotations

import random

import pytest
import torch

from batchgen import LLM, SamplingParams


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(3, 512) for _ in range(40)]
    out = [[rng.randrange(3, 512) for _ in range(rng.randint(2, 60))] for _ in range(n)]
    return out + [base + [5, 6, 7], base + [8, 9]]  # a shared prefix: the second would hit the cache


def _hf_logprobs(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), dim=-1) for p in prompts]


@pytest.mark.parametrize("engine", [dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=6, block_size=16,
                                                                               max_model_len=80)])
def test_prompt_logprobs_match_hf_forward(engine, tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    prompts = _prompts(4, seed=1)
    ref = _hf_logprobs(model_dir, prompts)
    llm = LLM(model_dir, dtype="float32", device="cpu", **{"num_kv_blocks": 64, **engine})
    llm.generate([prompts[-2]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # cache the prefix
    k = 3
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=k, ignore_eos=True),
                        use_tqdm=False)
    for p, lp, out in zip(prompts, ref, outs):
        assert out.error is None
        got = out.prompt_logprobs
        assert len(got) == len(p) and got[0] is None
        for j in range(1, len(p)):
            entry = got[j]
            assert entry[p[j]] == pytest.approx(lp[j - 1, p[j]].item(), abs=1e-4)
            top = lp[j - 1].topk(k)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t] == pytest.approx(v, abs=1e-4)
            assert len(entry) in (k, k + 1)
    assert outs[-1].num_cached_tokens == 0  # not reused: cached positions have no logits
    if "max_model_len" in engine:
        assert llm.stats()["preemptions"] > 0  # recomputed chunks are not scored twice


def test_prompt_logprobs_zero_gives_the_actual_token_only(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=32)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and [list(e) for e in out.prompt_logprobs[1:]] == [[6], [7], [8]]
