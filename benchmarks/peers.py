"""The contenders, each timed on one workload: batchgen, HF `generate` with static padded batches
(its best batch size, rows sorted by length), and HF `generate_batch` (continuous batching)."""

from __future__ import annotations

import time

import torch

from benchmarks.workloads import Workload

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def run_batchgen(model_dir: str, dtype: str, wl: Workload, **engine) -> dict:
    from batchgen import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, **engine)
    warmup = [[7] * 40, [9] * 24]  # shares no prefix with any workload row
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    before = llm.stats()
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in wl.max_tokens]
    t = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == m for o, m in zip(outs, wl.max_tokens))
    s = llm.stats()
    step = s["step_seconds"] - before["step_seconds"]
    model = s["model_seconds"] - before["model_seconds"]
    return dict(wall=wall, flops_per_token=_flops(llm.engine.model),
                engine_overhead=(step - model) / step if step else 0.0,
                prefix_cache_hit_rate=(s["cached_prompt_tokens"] - before["cached_prompt_tokens"])
                / max(1, s["prompt_tokens"] - before["prompt_tokens"]),
                steps=s["steps"] - before["steps"])


def _hf_model(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    model.generation_config.eos_token_id = None  # ignore_eos, like the others
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def run_hf_static(model_dir: str, dtype: str, wl: Workload, batch_sizes: list[int]) -> dict:
    """Best of several batch sizes; each batch runs to its longest row's max_tokens (padding waste)."""
    model = _hf_model(model_dir, dtype)
    order = sorted(range(len(wl.prompts)), key=lambda i: (len(wl.prompts[i]), wl.max_tokens[i]))
    best = None
    for bs in batch_sizes:
        t = time.perf_counter()
        for start in range(0, len(order), bs):
            rows = order[start:start + bs]
            width = max(len(wl.prompts[i]) for i in rows)
            ids = torch.tensor([[0] * (width - len(wl.prompts[i])) + wl.prompts[i] for i in rows])
            mask = torch.tensor([[0] * (width - len(wl.prompts[i])) + [1] * len(wl.prompts[i]) for i in rows])
            new = max(wl.max_tokens[i] for i in rows)
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
        wall = time.perf_counter() - t
        if best is None or wall < best["wall"]:
            best = dict(wall=wall, batch_size=bs)
    return best


def run_hf_generate_batch(model_dir: str, dtype: str, wl: Workload) -> dict:
    """transformers' continuous batching; it takes one max_new_tokens for all rows, so rows with a
    smaller max_tokens generate extra tokens that are not counted."""
    from transformers import GenerationConfig

    model = _hf_model(model_dir, dtype)
    config = GenerationConfig(max_new_tokens=max(wl.max_tokens), do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate_batch(inputs=wl.prompts, generation_config=config, progress_bar=False)
    return dict(wall=time.perf_counter() - t)


def _flops(model) -> float:
    from benchmarks.roofline import flops_per_token

    return flops_per_token(model)
