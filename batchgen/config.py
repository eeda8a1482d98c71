"""Engine configuration: one validated dataclass, the arguments of `LLM(...)` and the job's `engine:`.

Imports nothing of batchgen so every layer can use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "triton")  # auto: triton on CUDA, torch on CPU


SPEC_METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses tokens, the target verifies them in one forward."""
    method: str = "ngram"  # ngram: prompt lookup, no model; draft: a smaller model, same tokenizer
    num_speculative_tokens: int = 3
    draft_model: str | None = None  # for method "draft": alias, HF directory or .gguf
    prompt_lookup_min: int = 2  # ngram: shortest suffix of the text matched against earlier text
    prompt_lookup_max: int = 4  # ngram: longest
    max_batch_size: int = 32  # above this many running rows, verifying costs more than it saves: pause

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"speculative.{name}={getattr(self, name)!r} is invalid: {allowed}")

        check(self.method in SPEC_METHODS, "method", f"one of {', '.join(SPEC_METHODS)}")
        check(_pos_int(self.num_speculative_tokens), "num_speculative_tokens", "an int >= 1")
        check(self.method != "draft" or (isinstance(self.draft_model, str) and bool(self.draft_model)),
              "draft_model", "a model alias, directory or .gguf path (method 'draft' needs one)")
        check(_pos_int(self.prompt_lookup_min), "prompt_lookup_min", "an int >= 1")
        check(_pos_int(self.prompt_lookup_max) and self.prompt_lookup_max >= self.prompt_lookup_min,
              "prompt_lookup_max", "an int >= prompt_lookup_min")
        check(_pos_int(self.max_batch_size), "max_batch_size", "an int >= 1")

    @classmethod
    def from_value(cls, value: "SpeculativeConfig | dict | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative={value!r} is invalid: a mapping of speculative settings or null")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"unknown speculative setting(s) {unknown}; allowed: {', '.join(allowed)}")
        return cls(**value)


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"  # alias, local HF directory, or .gguf file
    dtype: str = "auto"  # auto: bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else fp32
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256  # most requests in one step
    max_num_batched_tokens: int | None = None  # token budget per step; None: 2048 on CPU, 8192 on GPU
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # overrides the memory budget
    kv_cache_memory: float | None = None  # GiB for the KV pool; None: sized from free memory
    gpu_memory_utilization: float = 0.9  # share of GPU memory batchgen may use (weights + KV)
    attention_backend: str = "auto"
    enforce_eager: bool = False  # True: no CUDA graphs (they replay decode-only steps on CUDA with Triton attention)
    enable_prefix_caching: bool = True
    # Shared-prefix (cascade) attention: decode rows whose block tables share 4+ leading blocks attend
    # to those blocks in one pass for the group (C++ kernel on CPU, Triton on CUDA)
    cascade_attention: bool = True
    seed: int = 0  # seeds the sampler of requests without their own seed
    tokenizer: str | None = None  # defaults to the model's own
    speculative: SpeculativeConfig | dict | None = None  # off by default
    lora_adapters: dict[str, str] | None = None  # adapter name -> PEFT LoRA directory
    max_loras: int = 8  # adapters resident on the device at once (the others wait in CPU memory)
    max_lora_rank: int = 64  # adapters of higher rank are refused at load
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) that one engine's model is sharded over
    # Reasoning markers (batchgen/reasoning.py): a parser name (deepseek_r1, qwen3) or {start, end};
    # splits reasoning_text from the answer and enables thinking_token_budget. None: off
    reasoning_parser: str | dict | None = None
    structured_outputs_compile_timeout: float = 60.0  # seconds a grammar may compile before its row errors

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"engine.{name}={getattr(self, name)!r} is invalid: {allowed}")

        check(isinstance(self.model, str) and bool(self.model), "model", "a model alias, directory or .gguf path")
        check(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
        check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
        check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
              f"one of {', '.join(ATTENTION_BACKENDS)}")
        check(self.max_model_len is None or _pos_int(self.max_model_len), "max_model_len", "an int >= 1")
        check(_pos_int(self.max_num_seqs), "max_num_seqs", "an int >= 1")
        check(self.max_num_batched_tokens is None or _pos_int(self.max_num_batched_tokens),
              "max_num_batched_tokens", "an int >= 1")
        check(_pos_int(self.block_size) and self.block_size % 8 == 0 and self.block_size <= 256,
              "block_size", "a multiple of 8 up to 256")
        check(self.num_kv_blocks is None or (_pos_int(self.num_kv_blocks) and self.num_kv_blocks >= 2),
              "num_kv_blocks", "an int >= 2")
        check(self.kv_cache_memory is None or (isinstance(self.kv_cache_memory, (int, float))
                                               and self.kv_cache_memory > 0),
              "kv_cache_memory", "a number of GiB > 0")
        check(isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1,
              "gpu_memory_utilization", "a number in (0, 1]")
        check(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "true or false")
        check(isinstance(self.enforce_eager, bool), "enforce_eager", "true or false")
        check(isinstance(self.cascade_attention, bool), "cascade_attention", "true or false")
        check(isinstance(self.seed, int), "seed", "an int")
        self.speculative = SpeculativeConfig.from_value(self.speculative)
        check(self.lora_adapters is None or (
            isinstance(self.lora_adapters, dict)
            and all(isinstance(k, str) and k and isinstance(v, (str, os.PathLike)) and str(v)
                    for k, v in self.lora_adapters.items())),
            "lora_adapters", "a mapping of adapter name -> PEFT adapter directory, or null")
        check(_pos_int(self.max_loras), "max_loras", "an int >= 1")
        check(_pos_int(self.max_lora_rank), "max_lora_rank", "an int >= 1")
        check(_pos_int(self.tensor_parallel_size), "tensor_parallel_size", "an int >= 1")
        check(isinstance(self.structured_outputs_compile_timeout, (int, float))
              and not isinstance(self.structured_outputs_compile_timeout, bool)
              and self.structured_outputs_compile_timeout > 0,
              "structured_outputs_compile_timeout", "a number of seconds > 0")
        if self.lora_adapters is not None:
            self.lora_adapters = {k: str(v) for k, v in self.lora_adapters.items()}
        from batchgen.reasoning import parse_reasoning

        try:
            parse_reasoning(self.reasoning_parser)
        except ValueError as e:
            raise ValueError(f"engine.reasoning_parser: {e}") from None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; allowed: {', '.join(cls.field_names())}")
        return cls(**kwargs)


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
