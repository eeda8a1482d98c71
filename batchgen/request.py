"""Request: the scheduler's view of one sequence (pure Python, no torch)."""

from __future__ import annotations

import enum

from batchgen.sampling import SamplingParams
from batchgen.sched.repetition import RepetitionDetector


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence. `num_tokens` = prompt + generated; each step computes some of the
    `num_tokens - num_computed_tokens` tokens not yet in the KV cache (prefill chunk or decode)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], lora: str | None = None, seed: int | None = None):
        self.request_id = request_id
        self.params = params
        self.lora = lora
        self.seed = seed  # per-request sampler seed (None: the engine's shared generator)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # prompt_logprobs: one entry per prompt token, None for the first (it has no context)
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.admitted = False  # has been scheduled at least once
        # Structured outputs: False while the request's grammar compiles (the engine sets it); the
        # scheduler admits only ready requests.
        self.grammar_ready = True
        # Tokens that end generation: EOS (unless ignore_eos) and stop_token_ids.
        self.stop_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_token_ids)
        self.repetition = RepetitionDetector(params.repetition_detection) if params.repetition_detection else None
        self.budget = None  # batchgen.reasoning.BudgetTracker under thinking_token_budget: set by the engine

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
