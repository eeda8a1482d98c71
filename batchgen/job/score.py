"""Scoring jobs (`task: score`): the logprobs of a given completion, without generating.

A row is `prompt` + `completion` (columns; the completion column is `score.completion_column`), or
`messages` whose last message is the assistant's. The prompt and the completion are tokenized
apart and concatenated, so the boundary between them is a token boundary (as lm-eval does it):
  - prompt rows: the prompt with the tokenizer's special tokens (BOS), the completion without;
  - chat rows: the chat template over the messages but the last, with the generation prompt,
    is the prompt; what the template renders for the whole conversation beyond it (the assistant's
    content and the template's end-of-turn tokens) is the completion.
The engine computes prompt_logprobs over the concatenation (one forward, chunked under the token
budget; the prefix cache is not used for these rows, see README) and samples one throwaway token.

Output columns (besides id, kept input columns, num_prompt_tokens, num_cached_tokens, error):
  num_completion_tokens, completion_logprobs (list<float>: each completion token's logprob),
  sum_logprob, mean_logprob, perplexity (exp(-mean_logprob)), and with `score.top_logprobs: k > 0`
  top_logprobs: per completion position, the k most likely tokens [{token_id, logprob}] (label scoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from batchgen.job.schema import OutputSchema
from batchgen.sampling import RequestOutput, SamplingParams


@dataclass(frozen=True)
class ScoreSpec:
    completion_column: str = "completion"
    top_logprobs: int = 0


SCORE_FIELDS = ("completion_column", "top_logprobs")


def parse_score(value: Any) -> ScoreSpec:
    """The job file's `score:` section; raises ValueError naming the field."""
    if value is None:
        return ScoreSpec()
    if not isinstance(value, dict):
        raise ValueError(f"score: expected a mapping with {', '.join(SCORE_FIELDS)}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(SCORE_FIELDS))
    if unknown:
        raise ValueError(f"score.{unknown[0]}: unknown field; expected one of {', '.join(SCORE_FIELDS)}")
    column = value.get("completion_column", "completion")
    if not isinstance(column, str) or not column:
        raise ValueError(f"score.completion_column: {column!r} is not allowed; expected a column name")
    k = value.get("top_logprobs", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"score.top_logprobs: {k!r} is not allowed; expected an integer >= 0")
    return ScoreSpec(column, k)


def score_params(score: ScoreSpec) -> SamplingParams:
    """What the engine runs for a scored row: its prompt logprobs, and one greedy token thrown away."""
    return SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=score.top_logprobs)


def render_score_row(planner, row) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether the prompt gets the tokenizer's special tokens)."""
    from batchgen.job.planner import RowError, _chat_messages

    if row.messages is not None:
        messages = _chat_messages(row.messages, planner.messages_column)
        if messages[-1]["role"] != "assistant":
            raise RowError(f"a scored {planner.messages_column!r} row must end with the assistant's message, "
                           f"got role {messages[-1]['role']!r}")
        if len(messages) < 2 and planner.system_prompt is None:
            raise RowError(f"{planner.messages_column!r} has only the assistant's message: nothing to condition on")
        prompt = planner._render(messages[:-1], row.data)
        full = planner._render(messages, row.data, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise RowError("the chat template renders the conversation without the generation prompt as its "
                           "prefix: cannot tell where the assistant's message starts")
        return prompt, full[len(prompt):], False
    prompt = planner._prompt(row)
    completion = row.data.get(planner.score.completion_column)
    if not isinstance(completion, str) or not completion:
        raise RowError(f"{planner.score.completion_column!r} must be a non-empty string to score, "
                       f"got {type(completion).__name__ if completion is not None else 'null'}")
    return prompt, completion, True


_TOKEN_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])


def score_fields(top_logprobs: int) -> list[pa.Field]:
    fields = [pa.field("num_completion_tokens", pa.int64()), pa.field("completion_logprobs", pa.list_(pa.float32())),
              pa.field("sum_logprob", pa.float64()), pa.field("mean_logprob", pa.float64()),
              pa.field("perplexity", pa.float64())]
    if top_logprobs:
        fields.append(pa.field("top_logprobs", pa.list_(pa.list_(_TOKEN_LOGPROB))))
    return fields


def score_record(out: RequestOutput, start: int, top_logprobs: int) -> dict[str, Any]:
    """The score columns of a finished row whose completion starts at prompt token `start`."""
    tokens = out.prompt_token_ids[start:]
    entries = out.prompt_logprobs[start:]
    values = [e[t] for t, e in zip(tokens, entries, strict=True)]
    total = math.fsum(values)
    mean = total / len(values)
    record = {"num_prompt_tokens": start, "num_completion_tokens": len(values), "completion_logprobs": values,
              "sum_logprob": total, "mean_logprob": mean, "perplexity": math.exp(-mean)}
    if top_logprobs:
        record["top_logprobs"] = [[{"token_id": t, "logprob": lp}
                                   for t, lp in sorted(e.items(), key=lambda kv: -kv[1])[:top_logprobs]]
                                  for e in entries]
    return record



class ScoreSchema(OutputSchema):
    """The output of a scoring job: the columns of OutputSchema a commit counts, and the scores."""

    def __init__(self, kept: pa.Schema, top_logprobs: int):
        super().__init__(kept, list_output=False, with_logprobs=False)  # the kept columns' sources, among others
        self.top_logprobs = top_logprobs
        self.arrow = pa.schema([
            pa.field("id", pa.string()), *kept, pa.field("finish_reason", pa.string()),
            pa.field("num_prompt_tokens", pa.int64()), *score_fields(top_logprobs),
            pa.field("num_generated_tokens", pa.int64()), pa.field("num_cached_tokens", pa.int64()),
            pa.field("error", pa.string()), pa.field("_shard_index", pa.int32()), pa.field("_row_index", pa.int64())])

    def success(self, item, out: RequestOutput) -> dict[str, Any]:
        record = self._base(item.row)
        record.update(finish_reason="scored", num_generated_tokens=0, num_cached_tokens=out.num_cached_tokens,
                      **score_record(out, item.score_start, self.top_logprobs))
        return record

    def failure(self, row, error: str, num_prompt_tokens: int = 0) -> dict[str, Any]:
        record = self._base(row)
        record.update(finish_reason="error", num_prompt_tokens=num_prompt_tokens, num_generated_tokens=0,
                      num_cached_tokens=0, error=error)
        return record

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "task": "score", "top_logprobs": self.top_logprobs}
