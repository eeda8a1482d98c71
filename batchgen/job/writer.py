"""Collect finished rows and commit them as Parquet parts every N written rows or T seconds (skipped
rows ride along with the next commit: they count toward neither N nor a part of their own)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow.parquet as pq

from batchgen.job.manifest import COUNTERS, OutputDir, encode_keys
from batchgen.job.reader import Row
from batchgen.job.schema import OutputSchema


class PartWriter:
    def __init__(self, out: OutputDir, schema: OutputSchema, every_rows: int, every_seconds: float,
                 record_extra: dict[str, Any] | None = None):
        self.out = out
        self.record_extra = record_extra or {}  # added to each commit record
        self.schema = schema
        self.every_rows = every_rows
        self.every_seconds = every_seconds
        self._records: list[dict[str, Any]] = []
        self._skipped: list[tuple[int, int]] = []  # on_error: skip rows, recorded so a resume skips them too
        self._last_commit = time.monotonic()
        self.committed = dict.fromkeys(COUNTERS, 0)  # what this run has committed so far

    def add(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def skip(self, row: Row) -> None:
        self._skipped.append(row.key)

    @property
    def num_buffered(self) -> int:
        return len(self._records) + len(self._skipped)

    def maybe_commit(self) -> bool:
        if not self.num_buffered:
            return False
        if len(self._records) >= self.every_rows or time.monotonic() - self._last_commit >= self.every_seconds:
            self.commit()
            return True
        return False

    def commit(self) -> None:
        """Commit everything buffered (a no-op when nothing is)."""
        self._last_commit = time.monotonic()
        if not self.num_buffered:
            return
        records = sorted(self._records, key=lambda r: (r["_shard_index"], r["_row_index"]))
        counts = {
            "rows": len(records),
            "errors": sum(r["error"] is not None for r in records),
            "skipped": len(self._skipped),
            "prompt_tokens": sum(r["num_prompt_tokens"] for r in records),
            "generated_tokens": sum(r["num_generated_tokens"] for r in records),
            "cached_tokens": sum(r["num_cached_tokens"] for r in records),
        }
        write = None
        if records:
            table = self.schema.table(records)

            def write(f):
                pq.write_table(table, f)

        self.out.commit(write, {
            "rows": encode_keys((r["_shard_index"], r["_row_index"]) for r in records),
            "skipped": encode_keys(self._skipped),
            **{f"num_{k}": v for k, v in counts.items()},
            **self.record_extra,
        })
        for k, v in counts.items():
            self.committed[k] += v
        self._records, self._skipped = [], []
