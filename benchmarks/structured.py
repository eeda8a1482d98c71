"""W6: structured outputs' cost. The same rows run twice in one engine: first constrained by their
JSON schemas (sampled, each row stops when its JSON closes), then unconstrained with each row's
max_tokens set to the length its constrained run produced (ignore_eos), so both runs generate the
same tokens in the same batch shapes and only the grammar work differs (no prefix cache, so the
second run gets no prefill for free)."""

from __future__ import annotations

import json
import time

from benchmarks.peers import flops_per_token
from benchmarks.workloads import Workload


def run_w6(model_dir: str, dtype: str, wl: Workload) -> dict:
    import jsonschema

    from batchgen import LLM, SamplingParams

    llm = LLM(model_dir, dtype=dtype, **wl.engine)
    warm = {"type": "object", "properties": {"w": {"type": "integer"}}, "required": ["w"]}  # builds the vocab table
    llm.generate([[7] * 40, [9] * 24], [SamplingParams(temperature=0, max_tokens=2),
                                        SamplingParams(temperature=0, max_tokens=4, structured_outputs={"json": warm})],
                 use_tqdm=False)
    before = llm.stats()
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=m, structured_outputs={"json": s})
                   for i, (m, s) in enumerate(zip(wl.max_tokens, wl.schemas))]
    t = time.perf_counter()
    outs = llm.generate(wl.prompts, constrained, use_tqdm=False)
    wall = time.perf_counter() - t
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    valid = 0
    for o, schema in zip(outs, wl.schemas):
        if o.outputs[0].finish_reason == "stop":
            try:
                jsonschema.validate(json.loads(o.outputs[0].text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    mid = llm.stats()
    plain = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    t = time.perf_counter()
    plain_outs = llm.generate(wl.prompts, plain, use_tqdm=False)
    plain_wall = time.perf_counter() - t
    assert [len(o.outputs[0].token_ids) for o in plain_outs] == lengths
    generated = sum(lengths)
    step = mid["step_seconds"] - before["step_seconds"]
    model = mid["model_seconds"] - before["model_seconds"]
    return dict(wall=wall, flops_per_token=flops_per_token(llm.engine.model), generated_tokens=generated,
                engine_overhead=(step - model) / step if step else 0.0,
                prefix_cache_hit_rate=(mid["cached_prompt_tokens"] - before["cached_prompt_tokens"])
                / max(1, mid["prompt_tokens"] - before["prompt_tokens"]),
                steps=mid["steps"] - before["steps"], plain_wall=plain_wall,
                plain_output_tok_s=generated / plain_wall, structured_vs_plain=plain_wall / wall,
                json_valid=valid, grammar_compiles=mid["structured_compiles"] - before.get("structured_compiles", 0))
