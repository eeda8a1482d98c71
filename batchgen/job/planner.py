"""Turn a window of rows into engine requests: validate, render, tokenize, then sort by prefix.

Offline we know many rows ahead, so we can order them: sorting a window by token ids is a
depth-first walk of the prefix trie, so rows that share a system prompt or few-shot block run
back to back and hit the engine's radix cache instead of recomputing the shared prefix. With LoRA
adapters the key is (adapter, token ids): rows of one adapter run together (adapter swaps are rare)
and, within them, in prefix order (the radix cache is keyed by adapter too).

Every way a row can be unusable is decided here, before the engine sees it, so that
on_error: fail can stop before generating anything of that row's window.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from batchgen.job.reader import SAMPLING_FIELDS, Row
from batchgen.job.spec import JobSpec
from batchgen.sampling import SamplingParams

_INT_FIELDS = {"n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "truncate_prompt_tokens",
               "prompt_logprobs", "thinking_token_budget"}


class RowError(ValueError):
    """Why one row cannot be generated; becomes that row's `error`."""


@dataclass(slots=True)
class Planned:
    row: Row
    token_ids: array | None = None  # int32: a window holds ~4 bytes per token, not ~36 as a list would
    params: SamplingParams | None = None
    error: str | None = None
    lora: str | None = None  # the adapter this row runs with; None: the base model
    score_start: int | None = None  # task: score: the completion's first token (prompt tokens before it)

    @property
    def num_prompt_tokens(self) -> int:
        return 0 if self.token_ids is None else len(self.token_ids)


class Planner:
    def __init__(self, tokenizer: Any, max_model_len: int, spec: JobSpec):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.defaults = spec.sampling
        self.system_prompt = spec.input.system_prompt
        self.prompt_column = spec.input.prompt_column or "prompt"
        self.messages_column = spec.input.messages_column or "messages"
        self.list_output = spec.list_output
        self.with_logprobs = spec.with_logprobs
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.lora_column = spec.lora.column if spec.lora is not None else None
        self.adapters = tuple(spec.lora.adapters) if spec.lora is not None else ()
        self.chat_template_kwargs = dict(spec.input.chat_template_kwargs or {})
        self.score = spec.score if spec.task == "score" else None

    def windows(self, rows: Iterable[Row], size: int) -> Iterator[list[Planned]]:
        window: list[Row] = []
        for row in rows:
            window.append(row)
            if len(window) >= size:
                yield self.plan(window)
                window = []
        if window:
            yield self.plan(window)

    def plan(self, rows: list[Row]) -> list[Planned]:
        """Bad rows first (input order), then the good ones sorted by token ids."""
        if self.score is not None:
            return self._plan_scores(rows)
        bad: list[Planned] = []
        chat: list[tuple[Planned, str]] = []
        plain: list[tuple[Planned, str]] = []
        for row in rows:
            item = Planned(row)
            try:
                if row.error is not None:
                    raise RowError(row.error)
                item.params = self.row_params(row.data)
                item.lora = self.row_adapter(row.data)
                if row.messages is not None:
                    chat.append((item, self._render(row.messages, row.data)))
                else:
                    plain.append((item, self._prompt(row)))
            except RowError as e:
                item.error = str(e)
                bad.append(item)
        # Chat templates already contain the special tokens they need (BOS, role markers), as in vLLM's chat().
        good = self._tokenize(chat, add_special_tokens=False) + self._tokenize(plain, add_special_tokens=True)
        for item in good:
            n = len(item.token_ids)
            if item.error is None and n > self.max_model_len:  # the engine's rule: a prompt of max_model_len still gets one token
                item.error = f"prompt has {n} tokens, but max_model_len is {self.max_model_len}"
        bad += [item for item in good if item.error]
        good = sorted((item for item in good if not item.error), key=lambda item: (item.lora or "", item.token_ids))
        return bad + good

    def row_adapter(self, data: dict[str, Any]) -> str | None:
        """The LoRA adapter the row's lora column names; None (the base model) for null or ""."""
        if self.lora_column is None:
            return None
        name = data.get(self.lora_column)
        if name is None or name == "":
            return None
        if not isinstance(name, str):
            raise RowError(f"{self.lora_column!r} must be an adapter name (a string) or null, "
                           f"got {type(name).__name__}")
        if name not in self.adapters:
            raise RowError(f"unknown LoRA adapter {name!r} in column {self.lora_column!r}; "
                           f"the job's lora.adapters are {', '.join(map(repr, self.adapters))}")
        return name

    def row_params(self, data: dict[str, Any]) -> SamplingParams:
        """The job's sampling defaults with this row's columns of the same names applied."""
        changes = {}
        for name in SAMPLING_FIELDS.intersection(data):
            value = data[name]
            if value is None:
                continue
            if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
                value = int(value)  # a nullable int column comes back from pandas-written files as float
            _check_override(name, value)
            changes[name] = value
        if not changes:
            return self.defaults
        try:
            params = self.defaults.replace(**changes)
        except (TypeError, ValueError) as e:
            raise RowError(f"invalid per-row sampling value: {e}") from None
        # One output schema per job: a row cannot turn generated_text into a list or add logprobs.
        if params.n > 1 and not self.list_output:
            raise RowError(f"n={params.n} needs sampling.n > 1 in the job file "
                           "(generated_text is a string column in this job)")
        if params.logprobs is not None and not self.with_logprobs:
            raise RowError("logprobs needs sampling.logprobs in the job file (the output has no logprobs column)")
        if params.logprobs is not None and params.logprobs > len(self.tokenizer):
            raise RowError(f"logprobs={params.logprobs} asks for more alternatives than the "
                           f"{len(self.tokenizer)} tokens there are")
        return params

    def _prompt(self, row: Row) -> str:
        prompt = row.prompt
        if prompt is None:
            raise RowError(f"no prompt: the row has neither {self.messages_column!r} nor {self.prompt_column!r}")
        if not isinstance(prompt, str):
            raise RowError(f"{self.prompt_column!r} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise RowError(f"{self.prompt_column!r} is empty")
        return prompt

    def _plan_scores(self, rows: list[Row]) -> list[Planned]:
        """task: score: prompt and completion tokenized apart (the boundary is a token boundary)."""
        from batchgen.job.score import render_score_row, score_params

        bad, good = [], []
        for row in rows:
            item = Planned(row, params=score_params(self.score))
            try:
                if row.error is not None:
                    raise RowError(row.error)
                item.lora = self.row_adapter(row.data)
                prompt, completion, special = render_score_row(self, row)
                prompt_ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
                completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
                if not prompt_ids:
                    raise RowError("the prompt encodes to no tokens: the completion's first token has no context")
                if not completion_ids:
                    raise RowError("the completion encodes to no tokens")
                n = len(prompt_ids) + len(completion_ids)
                if n > self.max_model_len:
                    raise RowError(f"prompt and completion have {n} tokens, but max_model_len is {self.max_model_len}")
                item.token_ids = array("i", prompt_ids + completion_ids)
                item.score_start = len(prompt_ids)
                good.append(item)
            except RowError as e:
                item.error = str(e)
                bad.append(item)
        return bad + sorted(good, key=lambda item: (item.lora or "", item.token_ids))

    def row_chat_template_kwargs(self, data: dict[str, Any] | None) -> dict[str, Any]:
        """input.chat_template_kwargs with the row's chat_template_kwargs column merged over it."""
        row = (data or {}).get("chat_template_kwargs")
        if row is None:
            return self.chat_template_kwargs
        if isinstance(row, str):  # a JSON object in a string column
            import json

            try:
                row = json.loads(row)
            except ValueError:
                row = None
        if not isinstance(row, dict):
            raise RowError("'chat_template_kwargs' must be an object of template variables, "
                           f"got {_describe((data or {}).get('chat_template_kwargs'))}")
        return {**self.chat_template_kwargs, **{k: v for k, v in row.items() if v is not None}}

    def _render(self, messages: Any, data: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise RowError("the model's tokenizer has no chat template; use prompt rows")
        messages = _chat_messages(messages, self.messages_column)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})  # the row's own one wins
        kwargs = self.row_chat_template_kwargs(data)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # noqa: BLE001 - a template raising on one row (jinja errors, bad roles) is that row's error
            raise RowError(f"chat template failed: {type(e).__name__}: {e}") from None

    def _tokenize(self, items: list[tuple[Planned, str]], add_special_tokens: bool) -> list[Planned]:
        if not items:
            return []
        # One batched call: fast tokenizers encode the whole window in parallel.
        try:
            encoded = self.tokenizer([text for _, text in items], add_special_tokens=add_special_tokens)["input_ids"]
        except Exception:  # noqa: BLE001 - one row's text (a lone surrogate) fails the batch: find it row by row
            encoded = [self._encode_one(item, text, add_special_tokens) for item, text in items]
        for (item, _), ids in zip(items, encoded, strict=True):
            if ids is None:
                continue
            if item.params is not None and item.params.truncate_prompt_tokens is not None:
                ids = ids[-item.params.truncate_prompt_tokens:]  # vLLM: the last N tokens
            item.token_ids = array("i", ids)
            if not ids:
                item.error = "the prompt encodes to no tokens"
        return [item for item, _ in items]

    def _encode_one(self, item: Planned, text: str, add_special_tokens: bool) -> list[int] | None:
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception as e:  # noqa: BLE001 - whatever the tokenizer raises is this row's error
            item.error = f"the prompt cannot be tokenized: {type(e).__name__}: {str(e)[:200]}"
            item.token_ids = array("i")
            return None


_FLOAT_FIELDS = {"temperature", "top_p", "min_p"}
_BOOL_FIELDS = {"ignore_eos", "skip_special_tokens"}
_INT_LIMIT = 1 << 63  # what the engine's seeds and counters hold (int64)


def _check_override(name: str, value: Any) -> None:
    """Types SamplingParams would take but the engine cannot run: bools as counts, NaN, huge ints."""
    if name in _INT_FIELDS and (isinstance(value, bool) or (isinstance(value, int) and not -_INT_LIMIT < value
                                                                < _INT_LIMIT)):
        raise RowError(f"per-row {name}={_clip(value)} is invalid: must be an int64")
    if name in _FLOAT_FIELDS and (isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value))):
        raise RowError(f"per-row {name}={_clip(value)} is invalid: must be a finite number")
    if name in _BOOL_FIELDS and not isinstance(value, bool):
        raise RowError(f"per-row {name}={_clip(value)} is invalid: must be true or false")
    if name == "stop_token_ids" and isinstance(value, list) and any(
            isinstance(t, bool) or (isinstance(t, int) and t >= _INT_LIMIT) for t in value):
        raise RowError(f"per-row {name}={_clip(value)} is invalid: must be a list of token ids")


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _chat_messages(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{column!r} must be a non-empty list of {{role, content}} objects, "
                       f"got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{column}[{i}] must be an object with role and content, got {_describe(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowError(f"{column}[{i}].role must be a non-empty string, got {_describe(role)}")
        if not isinstance(content, (str, list)):
            raise RowError(f"{column}[{i}].content must be a string, got {_describe(content)}")
        # Parquet structs carry every key of every message; a None key is one this message lacks.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list) and not value:
        return "an empty list"
    return type(value).__name__
