"""`batchgen validate`: check a job and its whole input without loading model weights.

It plans every row exactly as a run would (same reader, same planner, the model's own
tokenizer), so a row it calls bad is a row the run would record as an error, and reports prompt
lengths and the KV-cache memory a row needs, from the model config alone.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchgen.job.columns import is_json_field, source_key, storage_name
from batchgen.job.fingerprint import fingerprint_diff, job_fingerprint
from batchgen.job.manifest import job_totals
from batchgen.job.outdir import JobOutput
from batchgen.job.planner import Planner
from batchgen.job.reader import Reader
from batchgen.job.schema import OutputSchema
from batchgen.job.shards import Shard, resolve_shards
from batchgen.job.spec import OUTPUT_COLUMNS, JobSpec

_MAX_EXAMPLES = 10
_LATER = {"record": "error rows", "skip": "skipped", "fail": "bad rows: the run stops at the first"}
MiB = 1 << 20


@dataclass
class Validation:
    spec: JobSpec
    shards: list[Shard]
    max_model_len: int
    kv_bytes_per_token: int
    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[tuple[str, str]] = field(default_factory=list)  # (row id, error)
    prompt_tokens: list[int] = field(default_factory=list)  # of good rows
    kv_tokens: list[int] = field(default_factory=list)  # prompt + generation budget of good rows
    output: str = ""  # what a run would do with output.path
    adapter_rows: Counter = field(default_factory=Counter)  # good rows per LoRA adapter (None: the base model)
    missing_adapters: list[str] = field(default_factory=list)
    kept: list[tuple[str, str, str | None]] = field(default_factory=list)  # (column, storage, why JSON text)
    duplicate_rows: int = 0  # rows whose id an earlier row has (error rows in a run)
    not_kept: list[str] = field(default_factory=list)  # input columns named like output columns

    @property
    def ok(self) -> bool:
        """False when a run would stop: on_error: fail with a bad row, or an adapter directory missing."""
        return not (self.spec.on_error == "fail" and self.bad_rows) and not self.missing_adapters

    def format(self) -> str:
        lines = [f"job: {self.spec.source or '(in-memory)'}",
                 (f"input: {len(self.shards)} shard(s), {self.rows} rows, {self.bad_rows} bad "
                  f"(on_error: {self.spec.on_error})")]
        for row_id, error in self.bad_examples:
            lines.append(f"  bad row {row_id}: {error}")
        if self.bad_rows > len(self.bad_examples):
            lines.append(f"  ... and {self.bad_rows - len(self.bad_examples)} more")
        if self.duplicate_rows:
            lines.append(f"duplicate ids: {self.duplicate_rows} row(s) repeat the id of an earlier row; the first "
                         f"row with an id is generated, the later ones are {_LATER[self.spec.on_error]}")
        if self.kept:
            lines.append("kept columns, as the output stores them:")
            width = max(len(name) for name, _, _ in self.kept)
            for name, storage, kinds in self.kept:
                lines.append(f"  {name:<{width}}  {storage}" + (f" (values: {kinds})" if kinds else ""))
        if self.not_kept:
            lines.append(f"not kept (output columns have these names): {', '.join(self.not_kept)}")
        if self.prompt_tokens:
            p = sorted(self.prompt_tokens)
            lines.append(f"prompt tokens: min {p[0]}, median {p[len(p) // 2]}, max {p[-1]} "
                         f"(max_model_len {self.max_model_len})")
            lines += [f"  {label:>13} {count:>9} {'#' * max(1, round(40 * count / len(p)))}"
                      for label, count in histogram(p)]
            kv = sorted(self.kv_tokens)
            per_token = self.kv_bytes_per_token
            lines.append(f"KV cache per concurrent row (prompt + max_tokens, {per_token / 1024:.1f} KiB/token): "
                         f"median {kv[len(kv) // 2] * per_token / MiB:.1f} MiB, max {kv[-1] * per_token / MiB:.1f} MiB")
        if self.spec.lora is not None:
            lines.append("LoRA adapters (rows): " + ", ".join(
                f"{name} ({self.adapter_rows.get(name, 0)})" + (" MISSING" if name in self.missing_adapters else "")
                for name in self.spec.lora.adapters) + f"; base model ({self.adapter_rows.get(None, 0)})")
            for name in self.missing_adapters:
                lines.append(f"  lora.adapters.{name}: {self.spec.lora.adapters[name]} has no adapter_config.json")
        lines.append(f"output: {self.output}")
        return "\n".join(lines)


def validate_job(spec: JobSpec) -> Validation:
    from batchgen.models.loader import load_tokenizer, read_model_config

    shards = resolve_shards(spec.input)
    config = read_model_config(spec.model.path)
    tokenizer = load_tokenizer(spec.engine.get("tokenizer") or spec.model.path)
    max_model_len = spec.engine.get("max_model_len") or getattr(config, "max_position_embeddings", None) or 4096
    report = Validation(spec, shards, max_model_len, kv_bytes_per_token(config, spec.model.dtype))
    planner = Planner(tokenizer, max_model_len, spec)
    reader = Reader(shards, spec.input, columns=spec.read_columns)
    for window in planner.windows(reader, spec.input.group_window):
        for item in window:
            report.rows += 1
            if item.error is not None:
                report.bad_rows += 1
                if len(report.bad_examples) < _MAX_EXAMPLES:
                    report.bad_examples.append((item.row.id, item.error))
                continue
            n = item.num_prompt_tokens
            budget = item.params.max_tokens or max_model_len
            report.prompt_tokens.append(n)
            report.adapter_rows[item.lora] += 1
            report.kv_tokens.append(min(n + budget, max_model_len) + (item.params.n - 1) * budget)
    report.duplicate_rows = len(reader.duplicates())
    report.kept = kept_columns(spec, reader)
    if spec.output.keep_columns == "all":
        report.not_kept = [n for n in reader.arrow_schema().names if n in OUTPUT_COLUMNS and n != spec.input.id_column]
    report.output = _output_state(spec, shards)
    if spec.lora is not None:
        report.missing_adapters = [name for name, path in spec.lora.adapters.items()
                                   if "://" not in path and not os.path.exists(os.path.join(path, "adapter_config.json"))]
    return report


def kept_columns(spec: JobSpec, reader: Reader) -> list[tuple[str, str, str | None]]:
    """(column, storage, what values made it JSON text) for each column a run would keep."""
    schema = OutputSchema.for_job(spec, reader.arrow_schema(), [])
    profile = reader.column_profile
    return [(f.name, storage_name(f), profile.describe(source_key(f)) if is_json_field(f) and profile else None)
            for f in schema.kept]


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """2 (K and V) * layers * KV heads * head dim * bytes per element."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * _dtype_bytes(dtype)


def _dtype_bytes(dtype: str) -> int:
    if dtype == "auto":
        import torch

        from batchgen.models.loader import pick_dtype

        return pick_dtype("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")).itemsize
    return 4 if dtype == "float32" else 2


def histogram(values: list[int]) -> list[tuple[str, int]]:
    """Counts per power-of-two bucket: (1-16], (16-32], ..."""
    def bucket(v: int) -> int:
        return max(16, 1 << (max(v, 1) - 1).bit_length())

    counts = Counter(bucket(v) for v in values)
    return [(f"{max(1, b // 2 + 1) if b > 16 else 1}-{b}", counts[b]) for b in sorted(counts)]


def _output_state(spec: JobSpec, shards: list[Shard]) -> str:
    layout = JobOutput(spec.output.path)
    fingerprint = job_fingerprint(spec, shards)
    array = layout.read_array()
    if array is not None:
        committed = layout.committed(int(array["num_tasks"]))
        state = (f"{layout.url}: an array of {array['num_tasks']} tasks, {sum(committed.values())} rows committed "
                 f"({', '.join(f'task {i}: {n}' for i, n in sorted(committed.items())) or 'no task started'})")
        if array["fingerprint"] != fingerprint:
            changes = "; ".join(fingerprint_diff(array["fingerprint"], fingerprint))
            return f"{state}, of a different job ({changes}): run refuses it without --force"
        return f"{state}; its tasks resume from there"
    out = layout.root
    manifest = out.read_manifest()
    if manifest is None:
        return f"{out.url} (new)"
    if manifest["fingerprint"] != fingerprint:
        changes = "; ".join(fingerprint_diff(manifest["fingerprint"], fingerprint))
        return f"{out.url} holds a different job's output ({changes}): run refuses it without --force"
    totals = job_totals(out.records(), manifest.get("total_rows"))
    return f"{out.url}: {totals['rows_done']} rows committed; run resumes from there"
