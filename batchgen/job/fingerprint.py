"""What makes two runs the same job: resuming is only sound when all of this is unchanged.

Row keys are (shard index, row index), so the shard list (names, formats, sizes) is part of it;
so is everything that changes a row's output (model, sampling, engine settings, prompt columns,
error policy, kept columns, LoRA adapters). Commit cadence, the grouping window, the engine's
throughput knobs, speculative decoding (lossless: it changes how fast tokens come, not their
distribution) and how the rows are split over tasks and GPUs are not: they change when and how fast
rows are made, not what a row asks for, and a job requeued onto a bigger GPU must be able to raise
max_num_seqs and still resume. (The task count is checked separately: see tasks.py.)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from batchgen.job.shards import Shard
from batchgen.job.spec import JobSpec

# EngineConfig fields that only trade memory for speed. Any other (or future) field counts.
_THROUGHPUT_ONLY = {"device", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks",
                    "kv_cache_memory", "gpu_memory_utilization", "attention_backend", "enable_prefix_caching",
                    "enforce_eager"}


# SamplingParams fields added after outputs were first written: left out at their defaults, so
# those outputs keep their fingerprint (and resume).
_LATER_SAMPLING_DEFAULTS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                            "logit_bias": None, "allowed_token_ids": None, "bad_words": None,
                            "include_stop_str_in_output": False, "truncate_prompt_tokens": None,
                            "repetition_detection": None, "prompt_logprobs": None, "thinking_token_budget": None}


def _sampling(params) -> dict[str, Any]:
    values = dataclasses.asdict(params)
    return {k: v for k, v in values.items() if k not in _LATER_SAMPLING_DEFAULTS or v != _LATER_SAMPLING_DEFAULTS[k]}


def job_fingerprint(spec: JobSpec, shards: list[Shard]) -> dict[str, Any]:
    """A JSON-plain dict (lists, not tuples), so it compares equal to the copy read from the manifest."""
    inp = spec.input
    fingerprint = {
        "model": {"path": spec.model.path, "dtype": spec.model.dtype},
        "sampling": _sampling(spec.sampling),
        "engine": {k: v for k, v in sorted(spec.engine.items()) if k not in _THROUGHPUT_ONLY},
        "input": {
            "format": inp.format, "id_column": inp.id_column, "prompt_column": inp.prompt_column,
            "messages_column": inp.messages_column, "system_prompt": inp.system_prompt, "split": inp.split,
            "shards": [[s.name, s.format, s.size] for s in shards],
        },
        "output": {"keep_columns": spec.output.keep_columns},  # a tuple becomes a list in the JSON round trip
        "on_error": spec.on_error,
    }
    # Only when set, as lora below: outputs of jobs without them keep their fingerprint.
    if spec.input.chat_template_kwargs:
        fingerprint["input"]["chat_template_kwargs"] = spec.input.chat_template_kwargs
    if spec.output.reasoning is not None:
        fingerprint["output"]["reasoning"] = list(spec.output.reasoning)
    if spec.task != "generate":
        fingerprint["task"] = spec.task
        fingerprint["score"] = dataclasses.asdict(spec.score)
    if spec.lora is not None:  # only when set: outputs of jobs without adapters keep their fingerprint
        fingerprint["lora"] = {"adapters": dict(sorted(spec.lora.adapters.items())), "column": spec.lora.column}
    return json.loads(json.dumps(fingerprint))


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> list[str]:
    """Human-readable changes, e.g. "sampling.max_tokens: 8 -> 16"."""
    a, b = _flatten(old), _flatten(new)
    changes = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
               for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return changes[:limit] + ([f"... and {len(changes) - limit} more"] if len(changes) > limit else [])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}
