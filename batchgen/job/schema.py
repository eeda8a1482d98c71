"""The output table: one Arrow schema per job, and one record per input row.

The schema is fixed before the first part is written and stored in the manifest, because every
part must have the same schema for pyarrow.dataset and datasets.load_dataset to read the output as
one table. Parquet and HF inputs declare their column types; JSONL does not, so the reader profiles
every row of the input before the first part and columns.py decides each kept column's storage from
all of them: values that disagree in type are kept as JSON text, never nulled or changed.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import pyarrow as pa

from batchgen.job.columns import (
    ColumnProfile,
    column_field,
    is_json_field,
    source_key,
    storage_name,
    to_json_text,
)
from batchgen.job.planner import Planned
from batchgen.job.reader import Row
from batchgen.job.spec import OUTPUT_COLUMNS, JobSpec
from batchgen.sampling import CompletionOutput, RequestOutput

logger = logging.getLogger("batchgen")

_TOKEN_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])
# Per generated token, as in OpenAI's format: the sampled token, its logprob, the top alternatives.
_LOGPROB_ENTRY = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32()),
                            ("top_logprobs", pa.list_(_TOKEN_LOGPROB))])


class OutputSchema:
    def __init__(self, kept: pa.Schema, list_output: bool, with_logprobs: bool, with_reasoning: bool = False):
        self.kept = kept
        # (output name, input key): they differ only for a key that is not valid Unicode (column_field).
        self._kept_sources = [(f.name, source_key(f)) for f in kept]
        self.list_output = list_output
        self.with_logprobs = with_logprobs
        self.with_reasoning = with_reasoning  # output.reasoning: a reasoning_text column after generated_text
        text = pa.list_(pa.string()) if list_output else pa.string()
        fields = [pa.field("id", pa.string()), *kept,
                  pa.field("generated_text", text),
                  *([pa.field("reasoning_text", text)] if with_reasoning else []), pa.field("finish_reason", text),
                  pa.field("num_prompt_tokens", pa.int64()), pa.field("num_generated_tokens", pa.int64()),
                  pa.field("num_cached_tokens", pa.int64()), pa.field("error", pa.string())]
        if with_logprobs:
            entries = pa.list_(_LOGPROB_ENTRY)
            fields.append(pa.field("logprobs", pa.list_(entries) if list_output else entries))
        # The input position of each row: merge restores input order from it, resume checks against it.
        fields += [pa.field("_shard_index", pa.int32()), pa.field("_row_index", pa.int64())]
        self.arrow = pa.schema(fields)

    @classmethod
    def for_job(cls, spec: JobSpec, input_schema: pa.Schema | None, first_rows: list[Row]) -> OutputSchema:
        kept = _kept_schema(spec, input_schema, first_rows)
        if spec.task == "score":
            from batchgen.job.score import ScoreSchema

            return ScoreSchema(kept, spec.score.top_logprobs)
        return cls(kept, spec.list_output, spec.with_logprobs, spec.output.reasoning is not None)

    # ---- records --------------------------------------------------------------------------------

    def success(self, item: Planned, out: RequestOutput) -> dict[str, Any]:
        """The output row of a request that completed (the runner sends refused ones to failure())."""
        texts = [c.text for c in out.outputs]
        reasons = [c.finish_reason for c in out.outputs]
        record = self._base(item.row)
        record.update(generated_text=texts if self.list_output else texts[0],
                      finish_reason=reasons if self.list_output else reasons[0],
                      num_prompt_tokens=len(out.prompt_token_ids),
                      num_generated_tokens=out.num_generated_tokens,
                      num_cached_tokens=out.num_cached_tokens)
        if self.with_reasoning:
            reasoning = [c.reasoning_text or "" for c in out.outputs]
            record["reasoning_text"] = reasoning if self.list_output else reasoning[0]
        if self.with_logprobs:
            k = item.params.logprobs or 0
            entries = [_logprob_entries(c, k) for c in out.outputs]
            record["logprobs"] = entries if self.list_output else entries[0]
        return record

    def failure(self, row: Row, error: str, num_prompt_tokens: int = 0) -> dict[str, Any]:
        record = self._base(row)
        record.update(finish_reason=["error"] if self.list_output else "error", num_prompt_tokens=num_prompt_tokens,
                      num_generated_tokens=0, num_cached_tokens=0, error=error)
        return record

    def _base(self, row: Row) -> dict[str, Any]:
        record = {"id": row.id, "error": None, "_shard_index": row.shard, "_row_index": row.index}
        for name, source in self._kept_sources:
            record[name] = row.data.get(source)
        return record

    def table(self, records: list[dict[str, Any]]) -> pa.Table:
        kept = set(self.kept.names)
        return pa.table([_to_array([r.get(f.name) for r in records], f, kept=f.name in kept) for f in self.arrow],
                        schema=self.arrow)

    # ---- persistence (the manifest keeps it so that a resumed run writes the same schema) -------

    def to_json(self) -> dict[str, Any]:
        data = {"kept": base64.b64encode(self.kept.serialize().to_pybytes()).decode("ascii"),
                "list_output": self.list_output, "with_logprobs": self.with_logprobs}
        if self.with_reasoning:
            data["with_reasoning"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputSchema:
        kept = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["kept"])))
        if data.get("task") == "score":
            from batchgen.job.score import ScoreSchema

            return ScoreSchema(kept, data["top_logprobs"])
        return cls(kept, data["list_output"], data["with_logprobs"], data.get("with_reasoning", False))


def _kept_schema(spec: JobSpec, input_schema: pa.Schema | None, rows: list[Row]) -> pa.Schema:
    keep = spec.output.keep_columns
    if keep == "none":
        return pa.schema([])
    reserved = set(OUTPUT_COLUMNS)  # and the columns this job's options add
    if spec.output.reasoning is not None:
        reserved.add("reasoning_text")
    if spec.task == "score":
        from batchgen.job.score import score_fields

        reserved.update(["num_completion_tokens", "completion_logprobs", "sum_logprob", "mean_logprob",
                         "perplexity"], [f.name for f in score_fields(spec.score.top_logprobs)])
    if input_schema is None:  # no reader profile at hand (in-process callers): decide from these rows alone
        profile = ColumnProfile()
        for r in rows:
            profile.add(r.data)
        input_schema = profile.schema()
    if keep == "all":
        names = input_schema.names
        dropped = [n for n in names if n in reserved and n != spec.input.id_column]
        if dropped:
            logger.warning("input columns %s are not passed through: output columns have those names", dropped)
        # The id column is already the output's `id`.
        names = [n for n in names if n not in reserved and n != spec.input.id_column]
    else:
        names = list(keep)
    return pa.schema([input_schema.field(n) if n in input_schema.names else column_field(n, pa.string())
                      for n in names])


def kept_storage(schema: OutputSchema) -> dict[str, str]:
    """{kept column: how it is stored} (e.g. "JSON text", "int64"), for validate and stats.json."""
    return {f.name: storage_name(f) for f in schema.kept}


def _to_array(values: list[Any], f: pa.Field, kept: bool = False) -> pa.Array:
    if is_json_field(f):
        return pa.array([to_json_text(v) for v in values], type=f.type)
    try:
        return pa.array(values, type=f.type)
    except UnicodeEncodeError:
        if kept or not pa.types.is_string(f.type):
            raise
        # Text the job writes itself (an id, an error quoting the row) may hold a lone surrogate: escape it.
        return pa.array([v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
                         for v in values], type=f.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
        if not kept:
            raise
        # The storage was decided from every input row (columns.py), so a value that does not fit means
        # the input is not what it was then. Never null it: stop and say so.
        raise ValueError(f"kept column {f.name!r}: a value does not fit its stored type {f.type} ({e}); the "
                         "input changed since the output schema was fixed. Restore it, or start over with "
                         "--force") from None


def _logprob_entries(completion: CompletionOutput, k: int) -> list[dict[str, Any]]:
    if completion.logprobs is None:
        return []
    entries = []
    for token, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
        top = sorted(candidates.items(), key=lambda kv: -kv[1])[:k]
        entries.append({"token_id": token, "logprob": candidates.get(token),
                        "top_logprobs": [{"token_id": t, "logprob": lp} for t, lp in top]})
    return entries
