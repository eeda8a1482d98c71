"""Sampling parameters and request outputs, named as in vLLM so its users feel at home."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-5

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Constrain generation to a grammar (vLLM's names). Exactly one kind is set: `json` (a JSON
    schema, as a dict or JSON text), `regex`, `choice` (the output is one of these strings), `grammar`
    (EBNF/GBNF) or `json_object=True` (any JSON object). JSON is compact by default: no whitespace
    between tokens, so a sampling model cannot run away in spaces and newlines."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    # JSON: objects carry only the properties their schema lists (the schema's own additionalProperties
    # then decides nothing); False: JSON Schema's default, any extra property is allowed.
    disable_additional_properties: bool = True
    any_whitespace: bool = False  # JSON: allow whitespace between tokens (runs of at most max_whitespace)
    max_whitespace: int = 2

    def __post_init__(self) -> None:
        def bad(allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.structured_outputs={self.describe()} is invalid: {allowed}")

        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise bad(f"json is not valid JSON text: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise bad(f"json must be a JSON schema object, got {type(self.json).__name__}")
        kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise bad(f"set exactly one of {', '.join(_STRUCTURED_KINDS)} (got {', '.join(kinds) or 'none'})")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad("regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise bad("grammar must be a non-empty EBNF string")
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise bad("choice must be a non-empty list of non-empty strings")
        if not isinstance(self.json_object, bool):
            raise bad("json_object must be true or false")
        for name in ("disable_additional_properties", "any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false")
        if not isinstance(self.max_whitespace, int) or isinstance(self.max_whitespace, bool) or self.max_whitespace < 1:
            raise bad("max_whitespace must be an int >= 1")

    @property
    def kind(self) -> str:
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """Canonical JSON of what the grammar depends on: the compile cache's key."""
        value = {"kind": self.kind, "spec": getattr(self, self.kind)}
        if self.kind in ("json", "json_object"):
            value.update(strict=self.disable_additional_properties, ws=self.max_whitespace if self.any_whitespace else 0)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def describe(self, limit: int = 120) -> str:
        text = repr({k: getattr(self, k) for k in _STRUCTURED_KINDS if getattr(self, k, None) not in (None, False)})
        return text if len(text) <= limit else text[:limit] + "...}"

    @classmethod
    def from_value(cls, value: Any) -> "StructuredOutputsParams | None":
        """An instance, a mapping like {"json": {...}} (None values dropped: a Parquet struct carries
        every key of every row), or the same mapping as JSON text; None stays None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"SamplingParams.structured_outputs={value[:80]!r} is invalid: "
                                 f"not valid JSON text: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"SamplingParams.structured_outputs={value!r} is invalid: expected a mapping "
                             f"like {{\"json\": {{...}}}} with one of {', '.join(_STRUCTURED_KINDS)}")
        value = {k: v for k, v in value.items() if v is not None}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"SamplingParams.structured_outputs has unknown key(s) {unknown}; "
                             f"allowed: {', '.join(known)}")
        return cls(**value)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token
    skip_special_tokens: bool = True
    # Logits processors (batchgen.exec.penalties says what each does)
    repetition_penalty: float = 1.0  # HF/vLLM: over prompt and generated tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI: over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # {token id: bias added to the logit}
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words that may not be generated (vLLM semantics)
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens
    # Runaway guard: {max_period, min_repeats} (batchgen.sched.repetition); True: the defaults; None: off
    repetition_detection: dict[str, int] | bool | None = None
    prompt_logprobs: int | None = None  # logprob of every prompt token plus its top-k (None for the first)
    thinking_token_budget: int | None = None  # reasoning tokens before the engine closes the block
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output to a grammar

    def __post_init__(self) -> None:
        self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.logit_bias = _token_bias(self.logit_bias)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self._validate()
        self._validate_processors()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name, typ in (("n", int), ("min_tokens", int), ("top_k", int)):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise bad(name, f"must be an {typ.__name__}")
        if self.n < 1:
            raise bad("n", "must be >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an int >= 1 or None")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", "must be >= 0 and <= max_tokens")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (off) or >= 1")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "must be an int or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of them")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "must be an int >= 0 or None")
        if self.structured_outputs is not None and self.min_tokens > 0:
            raise bad("min_tokens", "must be 0 with structured_outputs (the grammar decides where the output ends)")

    def _validate_processors(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {allowed}")

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0 (1 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be a number in [-2, 2]")
        if self.logit_bias is not None and not all(number(b) and -100 <= b <= 100 for b in self.logit_bias.values()):
            raise bad("logit_bias", "biases must be numbers in [-100, 100]")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids or not all(_token_id(t) for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids >= 0")
        if self.bad_words is not None and not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            raise bad("bad_words", "must be a list of non-blank strings")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise bad("include_stop_str_in_output", "must be true or false")
        if self.truncate_prompt_tokens is not None and not (_token_id(self.truncate_prompt_tokens)
                                                            and self.truncate_prompt_tokens >= 1):
            raise bad("truncate_prompt_tokens", "must be an int >= 1 or None")
        if self.prompt_logprobs is not None and not _token_id(self.prompt_logprobs):
            raise bad("prompt_logprobs", "must be an int >= 0 or None")
        if self.thinking_token_budget is not None and not _token_id(self.thinking_token_budget):
            raise bad("thinking_token_budget", "must be an int >= 0 or None")
        if self.repetition_detection is not None:
            from batchgen.sched.repetition import check_params

            try:
                check_params(self.repetition_detection)
            except ValueError as e:
                raise bad("repetition_detection", str(e)) from None

    @property
    def uses_logits_processors(self) -> bool:
        """Any of the penalties, biases or bans of batchgen.exec.penalties."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words))

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def replace(self, **changes: Any) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_bias(value) -> dict[int, float] | None:
    """logit_bias as {int token id: float}: JSON objects have string keys ("123": 5), Parquet maps
    come back as [(key, value), ...] pairs."""
    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else value
    try:
        out = {}
        for key, bias in items:
            token = int(key)
            if token < 0 or str(token) != str(key).strip():
                raise ValueError
            out[token] = bias
        return out
    except (TypeError, ValueError):
        raise ValueError(f"SamplingParams.logit_bias={value!r} is invalid: must map token ids (ints >= 0) "
                         "to biases") from None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error"
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token_id: logprob}
    stop_reason: int | str | None = None  # the stop string or token id that ended it, if any
    reasoning_text: str | None = None  # output.reasoning / reasoning_parser: the reasoning block's text


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    finished: bool = True
    lora: str | None = None
    # prompt_logprobs: per prompt token {token_id: logprob} (its own and the top-k), None for the first
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
