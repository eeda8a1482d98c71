"""`batchgen status` and `batchgen merge`: read an output directory through its commit records.

The records, not a directory listing, say what is committed, so neither command can count an
orphan part. An array job's OUT (tasks.py) is read task by task: status shows each task's progress
and merge reads every task's directory, refusing while a task has not finished. merge also takes
several output directories of one job, and restores input order from each row's
(_shard_index, _row_index), streaming (merge.py): its memory does not grow with the output.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from batchgen.job import store
from batchgen.job.manifest import OutputDir, job_totals
from batchgen.job.merge import INTERNAL_COLUMNS, MergedRows, MergeError, write_merged
from batchgen.job.outdir import JobOutput

__all__ = ["INTERNAL_COLUMNS", "OutputError", "merge_outputs", "merged_rows", "output_status", "read_output"]


class OutputError(RuntimeError):
    pass


def output_status(url: str) -> dict[str, Any]:
    """Rows done/total, errors, tokens of OUT; for an array's OUT, per task too ("tasks", "unfinished")."""
    layout = JobOutput(url)
    array = layout.read_array()
    if array is not None:
        return _array_status(layout, array)
    out = layout.root
    manifest = out.read_manifest()
    if manifest is None:
        raise OutputError(f"{url} is not a batchgen output (no {out.meta}/manifest.json)")
    return _dir_status(layout, out, manifest)


def _dir_status(layout: JobOutput, out: OutputDir, manifest: dict[str, Any]) -> dict[str, Any]:
    records = out.records()
    committed = {r["part"] for r in records if r.get("part")}
    pending = [n for n in store.list_names(out.fs, out.pending_dir) if n not in committed]
    return {"output": out.url, "model": manifest["fingerprint"].get("model", {}).get("path"),
            **job_totals(records, manifest.get("total_rows")),
            "uncommitted_parts": len(pending), "last_run": out.read_stats(), "running": layout.running(out)}


def _array_status(layout: JobOutput, array: dict[str, Any]) -> dict[str, Any]:
    count = int(array["num_tasks"])
    tasks, records_all, total = [], [], 0
    for i in range(count):
        out = layout.task_dir(i)
        manifest = out.read_manifest()
        if manifest is None:
            tasks.append({"task": i, "output": out.url, "started": False, "complete": False, "rows_done": 0,
                          "rows_total": None})
            total = None
            continue
        records = out.records()
        records_all += records
        st = _dir_status(layout, out, manifest)
        tasks.append({"task": i, "started": True, **st})
        total = None if total is None or st["rows_total"] is None else total + st["rows_total"]
    unfinished = [t["task"] for t in tasks if not t["complete"]]
    slurm = layout.read_slurm() or {}
    return {"output": layout.url, "model": array["fingerprint"].get("model", {}).get("path"), "num_tasks": count,
            **job_totals(records_all, total), "complete": not unfinished,
            "uncommitted_parts": sum(t.get("uncommitted_parts", 0) for t in tasks),
            "tasks": tasks, "unfinished": unfinished, "slurm_script": slurm.get("script"), "last_run": None}


def format_status(status: dict[str, Any]) -> str:
    total = "?" if status["rows_total"] is None else status["rows_total"]
    state = "complete" if status["complete"] else "incomplete"
    what = f"array of {status['num_tasks']} tasks, " if "tasks" in status else ""
    lines = [
        (f"{status['output']}: {what}{state}, {status['rows_done']}/{total} rows "
         f"({status['errors']} errors, {status['skipped']} skipped) in {status['parts']} parts; "
         f"model {status['model']}"),
        (f"  tokens: {status['prompt_tokens']} prompt ({status['cached_tokens']} from the prefix cache), "
         f"{status['generated_tokens']} generated"),
    ]
    if status.get("running"):
        lines.append(f"  running now: {_running(status['running'])}")
    if status["uncommitted_parts"]:
        what = "a run in progress or an interrupted one" if status.get("running") else "an interrupted run"
        lines.append(f"  {status['uncommitted_parts']} uncommitted part(s) from {what} "
                     "(removed when the job resumes)")
    last = status.get("last_run")
    if last:
        lines.append(f"  last run {_last_run(last)}")
    for task in status.get("tasks", ()):
        lines.append(f"  task {task['task']}: {_task_line(task)}")
    if status.get("unfinished"):
        ids = ",".join(map(str, status["unfinished"]))
        script = status.get("slurm_script")
        index = ids if len(status["unfinished"]) == 1 else f"I for I in {ids.replace(',', ', ')}"
        how = (f"sbatch --array={ids} {script}" if script
               else f"batchgen run JOB --num-tasks {status['num_tasks']} --task-index {index}")
        lines.append(f"  unfinished: task(s) {ids.replace(',', ', ')}; rerun to resume: {how}")
    return "\n".join(lines)


def _last_run(last: dict[str, Any]) -> str:
    run = last["run"]
    how = f"stopped by {last['interrupted']}" if last["interrupted"] else "ended"
    text = f"{how}: {run['rows']} rows in {run['wall_time_s']:.1f}s, {run['output_tokens_per_s']:.1f} tok/s"
    if run.get("spec_acceptance_rate") is not None:
        text += f", speculative acceptance {run['spec_acceptance_rate']:.0%}"
    return text


def _running(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"] or 0))
    return f"host {holder['host']}, pid {holder['pid']}, started {started}"


def _task_line(task: dict[str, Any]) -> str:
    if not task["started"]:
        return "not started"
    total = "?" if task["rows_total"] is None else task["rows_total"]
    text = (f"{'complete' if task['complete'] else 'incomplete'}, {task['rows_done']}/{total} rows "
            f"({task['errors']} errors) in {task['parts']} parts")
    if task.get("last_run"):
        text += f"; last run {_last_run(task['last_run'])}"
    if task.get("running"):
        text += f"; running now ({_running(task['running'])})"
    return text


def merged_rows(urls: list[str], internal: bool = False) -> tuple[MergedRows, int | None]:
    """The committed rows of one job's output directories (MergedRows: batches() in input order),
    and the rows the job declares in total (None when unknown)."""
    fingerprint = None
    dirs, total = [], 0
    for url in urls:
        out = JobOutput(url).root
        manifest = out.read_manifest()
        if manifest is None:
            raise OutputError(f"{url} is not a batchgen output (no manifest)")
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise OutputError(f"{url} holds a different job's output than {urls[0]}; merge one job at a time")
        fingerprint = manifest["fingerprint"]
        total = None if total is None or manifest.get("total_rows") is None else total + manifest["total_rows"]
        dirs.append(out)
    rows = MergedRows(dirs, internal=internal)
    if not rows.parts:
        raise OutputError(f"{', '.join(urls)}: no committed rows to merge")
    return rows, total


def read_output(urls: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Every committed row of one job's output directories, in input order (as one table: for
    small outputs and tests; merge streams), and the job totals."""
    rows, total = merged_rows(urls, internal=True)
    try:
        table = pa.Table.from_batches(list(rows.batches()), schema=rows.schema)
    except MergeError as e:
        raise OutputError(str(e)) from None
    return table, rows.totals(total)


def expand_outputs(urls: list[str]) -> tuple[list[str], list[str], bool]:
    """(output directories to read, what is unfinished, whether every task has started): an array's OUT
    becomes its task directories."""
    dirs, unfinished, all_started = [], [], True
    for url in urls:
        st = output_status(url)
        if "tasks" in st:
            waiting = []
            for task in st["tasks"]:
                if task["started"]:
                    dirs.append(task["output"])
                else:
                    all_started = False
                if not task["complete"]:
                    total = "?" if task["rows_total"] is None else task["rows_total"]
                    waiting.append(f"task {task['task']} ("
                                   + (f"{task['rows_done']}/{total} rows" if task["started"] else "not started") + ")")
            if waiting:
                unfinished.append(f"{url}: {', '.join(waiting)}")
        else:
            dirs.append(url)
            if not st["complete"]:
                total = "?" if st["rows_total"] is None else st["rows_total"]
                unfinished.append(f"{url} ({st['rows_done']}/{total} rows)")
    return dirs, unfinished, all_started


def outputs_to_merge(urls: list[str], allow_partial: bool) -> tuple[list[str], list[str], bool]:
    """expand_outputs, refusing while rows are missing (unless allow_partial) or when nothing started."""
    dirs, unfinished, all_started = expand_outputs(urls)
    if unfinished and not allow_partial:
        raise OutputError("rows are missing, not finished: " + "; ".join(unfinished) + ". "
                          "Rerun what is unfinished (it resumes where it stopped), or pass --allow-partial "
                          "to merge what is committed")
    if not dirs:
        raise OutputError(f"{', '.join(urls)}: no task has started; nothing to merge")
    return dirs, unfinished, all_started


def merge_outputs(urls: list[str], to: str, allow_partial: bool = False) -> dict[str, Any]:
    """Write one Parquet file (JSON Lines for a .jsonl name) of every committed row in input order,
    streaming and atomically (a temporary file renamed); returns the job totals.

    While rows are missing (a task has not finished) it refuses, naming what is unfinished, unless
    allow_partial; the totals then list it under "unfinished".
    """
    dirs, unfinished, all_started = outputs_to_merge(urls, allow_partial)
    rows, total = merged_rows(dirs)
    try:
        write_merged(rows, to)
    except MergeError as e:
        raise OutputError(str(e)) from None
    totals = rows.totals(total)
    if unfinished:
        totals["complete"] = False
    if not all_started:
        totals["rows_total"] = None  # a task that never started has not counted its rows
    totals["unfinished"] = unfinished
    return totals
