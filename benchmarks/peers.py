"""The contenders, each timed on one workload: batchgen, HF `generate` with static padded batches
(its best batch size, rows sorted by length), and HF `generate_batch` (continuous batching)."""

from __future__ import annotations

import time

import torch

from benchmarks.roofline import flops_per_token
from benchmarks.workloads import Workload

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# The penalties-on run of W2 (peer "batchgen-penalties"): every row pays for the logits processors.
PENALTIES = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)


def run_batchgen(model_dir: str, dtype: str, wl: Workload, use_lora: bool = False, per_adapter: bool = False,
                 sampling: dict | None = None, **engine) -> dict:
    from batchgen import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, **{**wl.engine, **engine})
    decode_steps = _time_full_decode_steps(llm.engine.runner, len(wl.prompts))
    warmup = [[7] * 40, [9] * 24]  # shares no prefix with any workload row
    llm.generate(warmup, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    before = llm.stats()
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=wl.ignore_eos, **(sampling or {}))
              for m in wl.max_tokens]
    t = time.perf_counter()
    if per_adapter:  # the naive way to serve many adapters: one batch per adapter, one after another
        outs = []
        for name in sorted(set(wl.lora)):
            rows = [i for i, a in enumerate(wl.lora) if a == name]
            outs += llm.generate([wl.prompts[i] for i in rows], [params[i] for i in rows], use_tqdm=False,
                                 lora=name)
    else:
        outs = llm.generate(wl.prompts, params, use_tqdm=False, lora=wl.lora if use_lora else None)
    wall = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert not wl.ignore_eos or generated == wl.output_tokens
    s = llm.stats()
    step = s["step_seconds"] - before["step_seconds"]
    model = s["model_seconds"] - before["model_seconds"]
    return dict(wall=wall, flops_per_token=flops_per_token(llm.engine.model), generated_tokens=generated,
                spec_acceptance_rate=s.get("spec_acceptance_rate"),
                spec_mean_accepted_length=s.get("spec_mean_accepted_length"),
                engine_overhead=(step - model) / step if step else 0.0,
                prefix_cache_hit_rate=(s["cached_prompt_tokens"] - before["cached_prompt_tokens"])
                / max(1, s["prompt_tokens"] - before["prompt_tokens"]),
                steps=s["steps"] - before["steps"],
                mean_step_ms=1000 * step / max(1, s["steps"] - before["steps"]),
                full_decode_step_ms=1e3 * sorted(decode_steps)[len(decode_steps) // 2] if decode_steps else None)


def _time_full_decode_steps(runner, rows: int) -> list[float]:
    """Times (seconds) of the runner's steps in which all `rows` rows decode one token each."""
    times: list[float] = []
    execute = runner.execute

    def timed(sched):
        t = time.perf_counter()
        out = execute(sched)
        if len(sched.scheduled) == rows and all(r.num_tokens == 1 for r in sched.scheduled):
            times.append(time.perf_counter() - t)
        return out

    runner.execute = timed
    return times


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


def make_adapters(model_dir: str, names: list[str], out_dir) -> dict[str, str]:
    """PEFT LoRA adapters (r=16 on all seven projections, random non-zero B) saved once under out_dir."""
    from pathlib import Path

    paths = {n: str(Path(out_dir) / n) for n in names}
    if all((Path(p) / "adapter_config.json").exists() for p in paths.values()):
        return paths
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, path in enumerate(paths.values()):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
        peft.save_pretrained(path)
    return paths
