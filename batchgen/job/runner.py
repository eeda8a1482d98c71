"""Run a job: read rows, plan windows, keep the engine fed, commit finished rows, resume exactly.

    run_job("job.yaml")                         # what `batchgen run` calls
    run_job(spec, engine=engine, quiet=True)    # in-process, reusing an Engine built for spec's model
    run_job("job.yaml", task_index=2, num_tasks=8)      # one task of an array job (tasks.py)
    run_job("job.yaml", data_parallel="auto")           # one engine process per GPU (parallel.py)

OUT is reached only through outdir.JobOutput: the run holds its directory's lease from before the
model loads until it ends, and reads the commit records once, at the start.

The engine sees only add_request/step. The loop keeps about 2 * max_num_seqs rows in flight, so
the scheduler always has a queue to fill its batch from while the rest of the input waits on disk.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchgen.job.failpoints import failpoint
from batchgen.job.fingerprint import job_fingerprint
from batchgen.job.manifest import COUNTERS, OutputDir, RowSet, job_totals
from batchgen.job.outdir import JobConflict, JobOutput
from batchgen.job.planner import Planned, Planner
from batchgen.job.progress import Progress
from batchgen.job.reader import Reader, Row
from batchgen.job.schema import OutputSchema, kept_storage
from batchgen.job.shards import resolve_shards
from batchgen.job.signals import StopSignals
from batchgen.job.spec import JobSpec, apply_overrides, load_spec
from batchgen.job.tasks import resolve_data_parallel, resolve_task
from batchgen.job.writer import PartWriter

logger = logging.getLogger("batchgen")

__all__ = ["JobConflict", "JobFailed", "JobResult", "run_job"]

# Engine statistics of speculative decoding that stats.json and the summary report when present.
SPEC_STATS = ("spec_acceptance_rate", "spec_mean_accepted_length", "spec_acceptance_per_position")


class JobFailed(RuntimeError):
    """on_error: fail met a bad row."""


@dataclass
class JobResult:
    output: str
    stats: dict[str, Any]
    signal: int | None = None  # the signal that stopped the run early

    @property
    def exit_code(self) -> int:
        return 0 if self.signal is None else 128 + self.signal

    @property
    def complete(self) -> bool:
        return self.stats["job"]["complete"]


def run_job(job: JobSpec | str | os.PathLike | dict, *, overrides: list[str] | tuple[str, ...] = (),
            force: bool = False, quiet: bool = False, engine: Any = None, task_index: int | None = None,
            num_tasks: int | None = None, data_parallel: int | str | None = None) -> JobResult:
    """Run (or resume) a job, or this process's task of it, to completion or until SIGTERM/SIGINT.

    job: a JobSpec, a job file path, or the job file's content as a dict (paths relative to cwd).
    overrides: `--set` items for a job file or dict, e.g. ["sampling.max_tokens=64"].
    force: start over when OUT holds a different job's output (that output is deleted).
    engine: an Engine already built for the job's model, reused instead of loading a new one.
    task_index, num_tasks: this run's task of an array job; unset: the job file's sharding, then a
        Slurm array's environment (see tasks.py), else the whole job.
    data_parallel: "auto" (one engine process per visible GPU) or a number of engine processes
        over disjoint parts of this task's rows; unset: the job file's sharding.data_parallel, else 1.
    """
    if isinstance(job, JobSpec):
        if overrides:
            raise TypeError("overrides apply to a job file or dict, not to a JobSpec")
        spec = job
    elif isinstance(job, dict):
        spec = JobSpec.from_dict(apply_overrides(copy.deepcopy(job), overrides), os.getcwd())
    else:
        spec = load_spec(job, overrides)
    task = resolve_task(spec.sharding, task_index, num_tasks)
    workers, gpus = resolve_data_parallel(data_parallel if data_parallel is not None else spec.sharding.data_parallel,
                                          spec.engine.get("device", "auto"), spec.engine.get("tensor_parallel_size", 1))
    if workers > 1 and engine is not None:
        raise ValueError("data_parallel > 1 starts one engine per process; do not pass engine=")
    start = time.perf_counter()
    with StopSignals() as signals:
        shards = resolve_shards(spec.input)
        # The lease comes first: a second run on this output is refused before any model loads.
        with JobOutput(spec.output.path).open_task(task, job_fingerprint(spec, shards), force) as opened:
            out, manifest, done = opened.dir, opened.manifest, opened.done
            if task.is_array:
                logger.info("%s: rows with (shard + row) %% %d == %d, output in %s",
                            task.describe(), task.count, task.index, out.url)
            if len(done):
                logger.info("resuming %s: %d rows already committed", out.url, len(done))
            reader = Reader(shards, spec.input, columns=spec.read_columns, share=task.share, skip=done.contains)
            if "total_rows" not in manifest:
                manifest["total_rows"] = reader.count()
                out.write_manifest(manifest)
            if workers > 1:
                return _run_data_parallel(spec, out, manifest, reader, done, task, workers, gpus, signals, quiet,
                                          start)
            if engine is None:
                from batchgen.engine import (
                    Engine,  # torch is heavy: validate/status/merge never pay for it
                )

                engine = Engine(spec.engine_config())
            progress = Progress(manifest.get("total_rows"), len(done), quiet, engine.stats)
            run = _Run(spec, engine, out, manifest, reader, done, signals, progress)
            try:
                run.execute()
            finally:
                stats = write_stats(out, manifest, run.run_stats(time.perf_counter() - start), run.exhausted,
                                    signals.received)
    return JobResult(out.url, stats, signals.received)


def _run_data_parallel(spec: JobSpec, out: OutputDir, manifest: dict[str, Any], reader: Reader, done: RowSet,
                       task, workers: int, gpus: list[str] | None, signals: StopSignals, quiet: bool,
                       start: float) -> JobResult:
    """This task's rows over `workers` engine processes (parallel.py); the parent fixes the schema and
    writes the stats, the workers generate and commit."""
    from batchgen.job.parallel import empty_run, run_workers

    if not manifest.get("schema"):
        # Fixed once here, as a single run fixes it from its first window: all workers write one schema.
        needs_rows = spec.output.keep_columns != "none" and reader.arrow_schema() is None
        first = list(itertools.islice(iter(reader), spec.input.group_window)) if needs_rows else []
        if first or not needs_rows:
            ensure_schema(spec, out, manifest, reader, first)
    result = None
    try:
        result = run_workers(spec, out, manifest, reader.shards, done, task, workers, gpus, signals, quiet, start)
    finally:
        # Workers committed on their own: read their records again, and finish any commit a killed
        # worker left half done (the workers are gone, so no pending part is still being written).
        out.records(refresh=True)  # before recover(): a pending part with a worker's record is committed
        out.recover()
        run = result.run if result is not None else empty_run(workers, time.perf_counter() - start)
        exhausted = result is not None and result.exhausted
        stats = write_stats(out, manifest, run, exhausted, signals.received)
    if result.failed:
        raise JobFailed(result.failed)
    result.raise_for_crash()
    return JobResult(out.url, stats, signals.received)


def ensure_schema(spec: JobSpec, out: OutputDir, manifest: dict[str, Any], reader: Reader,
                  first: list[Row]) -> OutputSchema:
    """The output schema: the one in the manifest, or fixed now from the input (and `first` rows)."""
    if manifest.get("schema"):
        return OutputSchema.from_json(manifest["schema"])
    schema = OutputSchema.for_job(spec, reader.arrow_schema(), first)
    manifest["schema"] = schema.to_json()
    out.write_manifest(manifest)
    return schema


def write_stats(out: OutputDir, manifest: dict[str, Any], run: dict[str, Any], exhausted: bool,
                sig: int | None) -> dict[str, Any]:
    """Write _batchgen/stats.json for this run and the job (this task) so far; return it."""
    records = out.records()
    if exhausted and manifest.get("total_rows") is None:
        # An input too costly to count up front (a remote JSONL file) is counted by reading it once.
        manifest["total_rows"] = job_totals(records, None)["rows_done"]
        out.write_manifest(manifest)
    job = job_totals(records, manifest.get("total_rows"))
    stats = {"output": out.url, "interrupted": signal.Signals(sig).name if sig else None, "run": run, "job": job}
    if manifest.get("task"):
        stats["task"] = manifest["task"]
    if manifest.get("schema"):  # how each kept column is stored (JSON text where its values' types disagree)
        stats["kept_columns"] = kept_storage(OutputSchema.from_json(manifest["schema"]))
    out.write_stats(stats)
    return stats


class _Run:
    def __init__(self, spec: JobSpec, engine: Any, out: OutputDir, manifest: dict[str, Any], reader: Reader,
                 done: RowSet, signals: StopSignals, progress: Any, record_extra: dict[str, Any] | None = None):
        self.spec = spec
        self.engine = engine
        self.out = out
        self.manifest = manifest
        self.reader = reader
        self.signals = signals
        self.planner = Planner(engine.tokenizer, engine.max_model_len, spec)
        # Enough queued work that the scheduler can always fill a batch, little enough to stay small.
        self.max_in_flight = 2 * engine.config.max_num_seqs
        self.progress = progress  # advance(rows), close()
        self.record_extra = record_extra  # added to every commit record (data-parallel: the worker)
        self.writer: PartWriter | None = None
        self.in_flight: dict[str, Planned] = {}
        self.loop_seconds = 0.0  # reading, planning and generating; model loading excluded
        self.exhausted = False  # every row of the input was read and finished

    def execute(self) -> None:
        windows = self.planner.windows(self.reader, self.spec.input.group_window)
        start = time.perf_counter()
        if self.signals.received is not None:
            return  # stopped while the model was loading: nothing to do, nothing to commit
        try:
            first = next(windows, None)
            if first is None:
                self.exhausted = True  # every row is committed already
                return
            schema = ensure_schema(self.spec, self.out, self.manifest, self.reader, [p.row for p in first])
            self.writer = PartWriter(self.out, schema, self.spec.output.commit_every_rows,
                                     self.spec.output.commit_every_seconds, self.record_extra)
            self._loop(itertools.chain([first], windows), schema)
        finally:
            # Whatever ended the loop (the input, a signal, on_error: fail, a crash), rows in flight
            # are dropped (they run again on resume) and every finished row is committed.
            if self.in_flight:
                self.engine.abort_all()
                self.in_flight.clear()
            if self.writer is not None:
                self.writer.commit()
            self.progress.close()
            self.loop_seconds = time.perf_counter() - start

    def _loop(self, windows: Iterator[list[Planned]], schema: OutputSchema) -> None:
        queue: deque[Planned] = deque()
        more_windows = True
        failed: JobFailed | None = None  # on_error: fail met a bad row: admit nothing more, finish what runs
        while self.signals.received is None:
            finished = 0
            while failed is None and len(self.in_flight) < self.max_in_flight and (queue or more_windows):
                if not queue:
                    window = next(windows, None)
                    more_windows = window is not None
                    queue.extend(window or ())
                    continue
                item = queue.popleft()
                if item.error is not None:
                    failed = self._reject(item.row, item.error, item.num_prompt_tokens, schema)
                    finished += 1
                    continue
                self.engine.add_request(item.row.request_id, item.token_ids.tolist(), item.params, lora=item.lora)
                self.in_flight[item.row.request_id] = item
            if not self.in_flight:
                if failed is not None:
                    raise failed
                if not (queue or more_windows):
                    self.exhausted = True
                    break
                continue
            for output in self.engine.step():
                item = self.in_flight.pop(output.request_id)
                if output.error is None:
                    self.writer.add(schema.success(item, output))
                else:
                    failed = self._reject(item.row, output.error, len(output.prompt_token_ids), schema) or failed
                finished += 1
            failpoint("engine_step")
            self.writer.maybe_commit()
            self.progress.advance(finished)

    def _reject(self, row: Row, error: str, num_prompt_tokens: int, schema: OutputSchema) -> JobFailed | None:
        """Record or skip a bad row; under on_error: fail, return the error that will stop the job."""
        if self.spec.on_error == "fail":
            return JobFailed(f"row {row.id!r} ({self.reader.where(row.shard, row.index)}): {error}\n"
                             "on_error is fail: the job stopped before generating that row's window; "
                             "rows finished before it are committed")
        if self.spec.on_error == "skip":
            self.writer.skip(row)
        else:
            self.writer.add(schema.failure(row, error, num_prompt_tokens))
        return None

    def run_stats(self, wall_time: float) -> dict[str, Any]:
        """This run's counters and rates (stats.json's "run")."""
        engine_stats = self.engine.stats()
        run = dict(self.writer.committed) if self.writer else dict.fromkeys(COUNTERS, 0)
        # Throughput over the generation loop: a model load is a fixed cost, not a rate.
        loop = max(self.loop_seconds, 1e-9)
        run.update(wall_time_s=wall_time, generation_time_s=self.loop_seconds,
                   rows_per_s=(run["rows"] + run["skipped"]) / loop,
                   output_tokens_per_s=run["generated_tokens"] / loop,
                   prefix_cache_hit_rate=engine_stats.get("prefix_cache_hit_rate", 0.0))
        run.update({k: engine_stats[k] for k in SPEC_STATS if k in engine_stats})
        run.update({k: engine_stats[k] for k in ("reasoning_tokens", "answer_tokens") if k in engine_stats})
        run["engine"] = engine_stats
        return run
