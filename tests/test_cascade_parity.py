"""Cascade (shared-prefix) attention end to end: rows over a few shared system prompts generate
HF's greedy tokens on the embedded model, the runner grouped decode rows for the cascade kernel, and
the questions after a cached system prompt were attended as one-token rows (PrefixChunks).
In bf16 on AMX CPUs the decode steps run in the C++ stack (kernels/cpu_decoder.py), which calls the
cascade kernel itself; tests/kernels/test_cpu_decoder.py holds it to the layers' bits."""

from __future__ import annotations

import random

import pytest
import torch

import batchgen.exec.attention as attention
from batchgen import LLM, SamplingParams
from batchgen.exec.model_runner import ModelRunner
from batchgen.kernels.cpu_decode_attention import amx_available, load
from tests.conftest import assert_bf16_greedy_match, assert_greedy_match, hf_greedy

pytestmark = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernels here")


def _prompts(rows: int = 6) -> list[list[int]]:
    rng = random.Random(11)
    systems = [[rng.randrange(100, 20000) for _ in range(n)] for n in (70, 100)]  # 4 and 6 full blocks
    prompts = [systems[i % 2] + [rng.randrange(100, 20000) for _ in range(rng.randint(1, 12))] for i in range(rows)]
    rng.shuffle(prompts)
    return prompts


def _spy(monkeypatch) -> tuple[list, list, list]:
    """(the decode steps' cascade groups the runner built, as (grouped rows, groups); the PrefixChunks
    it built; calls of the AMX chunk kernel)."""
    calls, prefix_chunks, chunk_calls = [], [], []
    real_chunk_kernel = attention.cpu_chunk_attention
    real_cascade, real_prefix_chunks = ModelRunner._cascade, ModelRunner._prefix_chunks

    def counting(self, *args):
        out = real_cascade(self, *args)
        if out is not None:
            calls.append((len(out.rows), len(out.blocks)))
        return out

    def recording(self, *args):
        out = real_prefix_chunks(self, *args)
        if out is not None:
            prefix_chunks.append(out)
        return out

    def counting_chunks(*args):
        chunk_calls.append(args[4].shape[0])  # the chunks
        return real_chunk_kernel(*args)

    monkeypatch.setattr(ModelRunner, "_cascade", counting)
    monkeypatch.setattr(ModelRunner, "_prefix_chunks", recording)
    monkeypatch.setattr(attention, "cpu_chunk_attention", counting_chunks)
    return calls, prefix_chunks, chunk_calls


def test_shared_prefix_rows_match_hf_through_cascade(smol_dir, monkeypatch):
    calls, prefix_chunks, _ = _spy(monkeypatch)
    prompts = _prompts()
    llm = LLM(smol_dir, dtype="float32")  # cascade_attention is on by default
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    assert 2 in {groups for _, groups in calls}  # a decode step grouped the rows of both system prompts
    assert prefix_chunks  # questions after a cached system prompt attended it as one-token rows
    assert_greedy_match(smol_dir, prompts, ours, hf_greedy(smol_dir, prompts, 8))


def test_shared_prefix_rows_bf16_match_hf_bf16(smol_dir, monkeypatch):
    """bf16: 8 rows per system prompt, so a group holds >= 16 queries per KV head and the shared
    pass runs on AMX tiles where the CPU has them (P rounded to bf16), as do the prefill chunks
    (elsewhere: the bf16 pass and PrefixChunks); divergences only at bf16 ties."""
    from transformers import AutoModelForCausalLM

    calls, prefix_chunks, chunk_calls = _spy(monkeypatch)
    prompts = _prompts(16)
    llm = LLM(smol_dir, dtype="bfloat16")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert 2 in {groups for _, groups in calls}
    assert (chunk_calls and not prefix_chunks) if amx_available() else (prefix_chunks and not chunk_calls)
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval()
    ours = [o.outputs[0].token_ids for o in outs]
    exact = assert_bf16_greedy_match(hf, prompts, ours, hf_greedy(None, prompts, 8, model=hf))
    assert exact >= len(prompts) // 2



def test_cascade_attention_off_never_calls_the_cascade_kernel(smol_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "cascade_decode_attention_cpu", lambda *a: calls.append(a))
    llm = LLM(smol_dir, dtype="float32", cascade_attention=False)
    llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert llm.engine.runner.cascade_min_blocks == 0 and not calls
