"""Committed rows of one job's output directories, in input order, in bounded memory.

    rows = MergedRows([JobOutput(url).root])        # or the task directories of an array
    rows.schema                                     # the parts' schemas unified
    for batch in rows.batches(): ...                # pa.RecordBatch, in (_shard_index, _row_index) order
    write_merged(rows, "result.parquet")            # or "result.jsonl": temp file + rename

Every part holds its rows sorted by (shard, row) (writer.py sorts before it commits), and its
commit record lists them, so each part's first key is known without opening it. Parts are taken
in order of their first key, and a sweep emits the rows below the next unopened part's first key:
no unopened part can hold a smaller one. Only the parts whose key ranges overlap the sweep line
are in memory at once: about one per writer that committed concurrently (one per data-parallel
worker), each at most output.commit_every_rows rows, whatever the size of the output. The commit
records are read one at a time and only each part's first key and counters are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job import store
from batchgen.job.columns import decode_json_columns
from batchgen.job.manifest import OutputDir, job_totals

INTERNAL_COLUMNS = ("_shard_index", "_row_index")
_ROW_BITS = 40  # key = shard << 40 | row: one int64 that sorts in input order
_NO_KEY = (1 << 63) - 1  # above every key: the sweep's last bound
_BATCH_ROWS = 64 * 1024  # rows per emitted batch (and per row group of a merged Parquet file)


class MergeError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Part:
    first_key: int
    directory: OutputDir
    name: str


def _first_key(record: dict[str, Any]) -> int | None:
    firsts = [(int(shard) << _ROW_BITS) | rows[0] for shard, rows in record.get("rows", {}).items() if rows]
    return min(firsts) if firsts else None


def _keys(table: pa.Table) -> np.ndarray:
    shard = table["_shard_index"].to_numpy().astype(np.int64)
    row = table["_row_index"].to_numpy().astype(np.int64)
    return (shard << _ROW_BITS) | row


def _describe_key(key: int) -> str:
    return f"(shard {key >> _ROW_BITS}, row {key & ((1 << _ROW_BITS) - 1)})"


class MergedRows:
    """The committed rows of `directories` (one job's), as record batches in input order."""

    def __init__(self, directories: list[OutputDir], internal: bool = False):
        self.internal = internal  # keep _shard_index/_row_index in what batches() yields
        self.parts: list[_Part] = []
        counters: list[dict[str, Any]] = []  # each record without its row lists: what job_totals sums
        for directory in directories:
            for record in directory.iter_records():
                counters.append({k: v for k, v in record.items() if k.startswith("num_") or k == "part"})
                key = _first_key(record)
                if record.get("part") and key is not None:
                    self.parts.append(_Part(key, directory, record["part"]))
        self.parts.sort(key=lambda p: p.first_key)
        self.records = counters
        self.num_rows = sum(r.get("num_rows", 0) for r in counters)
        schemas = [self._read_schema(p) for p in self.parts]
        self.full_schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
        self.schema = (self.full_schema if internal or self.full_schema is None else
                       pa.schema([f for f in self.full_schema if f.name not in INTERNAL_COLUMNS]))

    def totals(self, total_rows: int | None) -> dict[str, Any]:
        return job_totals(self.records, total_rows)

    def batches(self, batch_rows: int = _BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Every committed row once, in input order; raises MergeError when a row is in two parts."""
        pending: list[pa.Table] = []
        pending_rows = 0
        for table in self._sorted_tables():
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= batch_rows:
                yield from self._flush(pending, batch_rows)
                pending, pending_rows = [], 0
        if pending:
            yield from self._flush(pending, batch_rows)

    def _flush(self, tables: list[pa.Table], batch_rows: int) -> Iterator[pa.RecordBatch]:
        table = pa.concat_tables(tables)
        if not self.internal:
            table = table.drop_columns(list(INTERNAL_COLUMNS))
        yield from table.combine_chunks().to_batches(max_chunksize=batch_rows)

    def _sorted_tables(self) -> Iterator[pa.Table]:
        """Runs of rows in key order: the sweep of the module docstring."""
        open_parts: list[list[Any]] = []  # [table, keys, position of its first row not yet emitted]
        last = -1
        for i in range(len(self.parts) + 1):
            bound = self.parts[i].first_key if i < len(self.parts) else _NO_KEY
            slices, slice_keys = [], []
            for entry in open_parts:
                table, keys, pos = entry
                end = int(np.searchsorted(keys, bound, side="left"))
                if end > pos:
                    slices.append(table.slice(pos, end - pos))
                    slice_keys.append(keys[pos:end])
                    entry[2] = end
            open_parts = [e for e in open_parts if e[2] < len(e[1])]
            if slices:
                table, keys = pa.concat_tables(slices), np.concatenate(slice_keys)
                if len(slices) > 1:  # rows of parts committed side by side (data-parallel workers)
                    order = np.argsort(keys, kind="stable")
                    table, keys = table.take(pa.array(order)), keys[order]
                repeated = np.flatnonzero(keys[1:] == keys[:-1])
                if keys[0] <= last or repeated.size:
                    key = int(keys[0]) if keys[0] <= last else int(keys[repeated[0]])
                    raise MergeError(f"input row {_describe_key(key)} is in more than one output part; "
                                     "were two runs or tasks given overlapping shares?")
                last = int(keys[-1])
                yield table
            if i < len(self.parts):
                table = self._read_part(self.parts[i])
                keys = _keys(table)
                if np.any(keys[1:] < keys[:-1]):  # written unsorted (not by writer.py): sort it once
                    order = np.argsort(keys, kind="stable")
                    table, keys = table.take(pa.array(order)), keys[order]
                if len(keys):
                    open_parts.append([table, keys, 0])

    def _read_schema(self, part: _Part) -> pa.Schema:
        with part.directory.fs.open(part.directory.path(part.name), "rb") as f:
            return pq.read_schema(f)

    def _read_part(self, part: _Part) -> pa.Table:
        try:
            with part.directory.fs.open(part.directory.path(part.name), "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            raise MergeError(f"{part.directory.url}: committed part {part.name} is missing (deleted by hand?); "
                             "rerun the job to repair an interrupted commit, or restore it") from None
        return _conform(table, self.full_schema)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: missing ones as nulls, others cast (widened)."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table[f.name]
            columns.append(column if column.type == f.type else column.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def write_merged(rows: MergedRows, to: str) -> int:
    """Write the rows to `to` (Parquet, or JSON Lines for a .jsonl name) atomically; returns the row count."""
    fs, path = store.open_store(to)
    jsonl = path.endswith((".jsonl", ".ndjson"))
    written = 0
    with store.atomic_open(fs, path) as f:
        if jsonl:
            for batch in rows.batches():
                # JSON-text kept columns go out as the JSON values they hold: JSONL in, JSONL out, unchanged.
                records = decode_json_columns(pa.Table.from_batches([batch]))
                f.write("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                for r in records).encode("utf-8"))
                written += batch.num_rows
        else:
            with pq.ParquetWriter(f, rows.schema) as writer:
                for batch in rows.batches():
                    writer.write_batch(batch, row_group_size=_BATCH_ROWS)
                    written += batch.num_rows
    return written
