"""Cascade (shared-prefix) attention end to end: rows over a few shared system prompts generate
HF's greedy tokens on the embedded model, and the cascade kernel really ran on grouped rows."""

from __future__ import annotations

import random

import pytest

import batchgen.exec.attention as attention
from batchgen import LLM, SamplingParams
from batchgen.kernels.cpu_decode_attention import load
from tests.conftest import assert_greedy_match, hf_greedy

pytestmark = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernels here")


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    systems = [[rng.randrange(100, 20000) for _ in range(n)] for n in (70, 100)]  # 4 and 6 full blocks
    prompts = [systems[i % 2] + [rng.randrange(100, 20000) for _ in range(rng.randint(1, 12))] for i in range(6)]
    rng.shuffle(prompts)
    return prompts


def test_shared_prefix_rows_match_hf_through_cascade(smol_dir, monkeypatch):
    calls = []
    real = attention.cascade_decode_attention_cpu

    def counting(q, *args):  # the real kernel, counted
        calls.append((q.shape[0], len(args[-1])))
        return real(q, *args)

    monkeypatch.setattr(attention, "cascade_decode_attention_cpu", counting)
    prompts = _prompts()
    llm = LLM(smol_dir, dtype="float32")  # cascade_attention is on by default
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert calls and max(groups for _, groups in calls) == 2  # both system prompts grouped in some step
    assert_greedy_match(smol_dir, prompts, ours, hf_greedy(smol_dir, prompts, 8))



def test_cascade_attention_off_never_calls_the_cascade_kernel(smol_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "cascade_decode_attention_cpu", lambda *a: calls.append(a))
    llm = LLM(smol_dir, dtype="float32", cascade_attention=False)
    llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert llm.engine.runner.cascade_min_blocks == 0 and not calls
