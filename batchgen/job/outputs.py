"""`batchgen status` and `batchgen merge`: read an output directory through its commit records.

The records, not a directory listing, say what is committed, so neither command can count an
orphan part. merge takes several output directories of the same job (the tasks of an array job)
and restores input order from each row's (_shard_index, _row_index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job import store
from batchgen.job.manifest import OutputDir, job_totals

INTERNAL_COLUMNS = ("_shard_index", "_row_index")


class OutputError(RuntimeError):
    pass


def output_status(url: str) -> dict[str, Any]:
    out = OutputDir(url)
    manifest = out.read_manifest()
    if manifest is None:
        raise OutputError(f"{url} is not a batchgen output (no {out.meta}/manifest.json)")
    records = out.records()
    committed = {r["part"] for r in records if r.get("part")}
    pending = [n for n in store.list_names(out.fs, out.pending_dir) if n not in committed]
    return {"output": url, "model": manifest["fingerprint"]["model"]["path"],
            **job_totals(records, manifest.get("total_rows")),
            "uncommitted_parts": len(pending), "last_run": out.read_stats()}


def format_status(status: dict[str, Any]) -> str:
    total = "?" if status["rows_total"] is None else status["rows_total"]
    state = "complete" if status["complete"] else "incomplete"
    lines = [
        (f"{status['output']}: {state}, {status['rows_done']}/{total} rows "
         f"({status['errors']} errors, {status['skipped']} skipped) in {status['parts']} parts; "
         f"model {status['model']}"),
        (f"  tokens: {status['prompt_tokens']} prompt ({status['cached_tokens']} from the prefix cache), "
         f"{status['generated_tokens']} generated"),
    ]
    if status["uncommitted_parts"]:
        lines.append(f"  {status['uncommitted_parts']} uncommitted part(s) from an interrupted run "
                     "(removed when the job resumes)")
    last = status.get("last_run")
    if last:
        run = last["run"]
        how = f"stopped by {last['interrupted']}" if last["interrupted"] else "ended"
        lines.append(f"  last run {how}: {run['rows']} rows in {run['wall_time_s']:.1f}s, "
                     f"{run['output_tokens_per_s']:.1f} tok/s")
    return "\n".join(lines)


def read_output(urls: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Every committed row of one job's output directories, in input order, and the job totals."""
    fingerprint = None
    tables, records_all, total = [], [], 0
    for url in urls:
        out = OutputDir(url)
        manifest = out.read_manifest()
        if manifest is None:
            raise OutputError(f"{url} is not a batchgen output (no manifest)")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise OutputError(f"{url} holds a different job's output than {urls[0]}; merge one job at a time")
        fingerprint = manifest["fingerprint"]
        total = None if total is None or manifest.get("total_rows") is None else total + manifest["total_rows"]
        records = out.records()
        records_all += records
        for record in records:
            if record.get("part"):
                with out.fs.open(out.path(record["part"]), "rb") as f:
                    tables.append(pq.read_table(f))
    if not tables:
        raise OutputError(f"{', '.join(urls)}: no committed rows to merge")
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by([(c, "ascending") for c in INTERNAL_COLUMNS])
    shard = table["_shard_index"].to_numpy()
    row = table["_row_index"].to_numpy()
    dup = np.flatnonzero((shard[1:] == shard[:-1]) & (row[1:] == row[:-1]))
    if dup.size:
        raise OutputError(f"input row (shard {shard[dup[0]]}, row {row[dup[0]]}) is in more than one output; "
                          "were two tasks given overlapping shares?")
    return table, job_totals(records_all, total)


def merge_outputs(urls: list[str], to: str) -> dict[str, Any]:
    """Write one Parquet file of every committed row in input order; returns the job totals."""
    table, totals = read_output(urls)
    table = table.drop_columns(list(INTERNAL_COLUMNS))
    fs, path = store.open_store(to)
    with store.atomic_open(fs, path) as f:
        pq.write_table(table, f)
    return totals
