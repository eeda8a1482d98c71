"""Run a job: read rows, plan windows, keep the engine fed, commit finished rows, resume exactly.

    run_job("job.yaml")                         # what `batchgen run` calls
    run_job(spec, engine=engine, quiet=True)    # in-process, reusing an Engine built for spec's model

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
from batchgen.job.fingerprint import fingerprint_diff, job_fingerprint
from batchgen.job.manifest import COUNTERS, OutputDir, RowSet, job_totals
from batchgen.job.planner import Planned, Planner
from batchgen.job.progress import Progress
from batchgen.job.reader import EVERY_ROW, Reader, Row, RowShare
from batchgen.job.schema import OutputSchema
from batchgen.job.shards import resolve_shards
from batchgen.job.signals import StopSignals
from batchgen.job.spec import JobSpec, apply_overrides, load_spec
from batchgen.job.writer import PartWriter

logger = logging.getLogger("batchgen")


class JobConflict(RuntimeError):
    """The output directory belongs to a different job (or to no job at all)."""


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
            force: bool = False, quiet: bool = False, engine: Any = None, share: RowShare = EVERY_ROW) -> JobResult:
    """Run (or resume) a job to completion or until SIGTERM/SIGINT.

    job: a JobSpec, a job file path, or the job file's content as a dict (paths relative to cwd).
    overrides: `--set` items for a job file or dict, e.g. ["sampling.max_tokens=64"].
    force: start over when OUT holds a different job's output (that output is deleted).
    engine: an Engine already built for the job's model, reused instead of loading a new one.
    share: the rows of one task of an array job.
    """
    if isinstance(job, JobSpec):
        if overrides:
            raise TypeError("overrides apply to a job file or dict, not to a JobSpec")
        spec = job
    elif isinstance(job, dict):
        spec = JobSpec.from_dict(apply_overrides(copy.deepcopy(job), overrides), os.getcwd())
    else:
        spec = load_spec(job, overrides)
    start = time.perf_counter()
    with StopSignals() as signals:
        shards = resolve_shards(spec.input)
        out = OutputDir(spec.output.path)
        manifest = open_output(out, job_fingerprint(spec, shards), force)
        done = out.committed_rows()
        if len(done):
            logger.info("resuming %s: %d rows already committed", out.url, len(done))
        reader = Reader(shards, spec.input, columns=spec.read_columns, share=share, skip=done.contains)
        if "total_rows" not in manifest:
            manifest["total_rows"] = reader.count()
            out.write_manifest(manifest)
        if engine is None:
            from batchgen.engine import (
                Engine,  # torch is heavy: validate/status/merge never pay for it
            )

            engine = Engine(spec.engine_config())
        run = _Run(spec, engine, out, manifest, reader, done, signals, quiet)
        try:
            run.execute()
        finally:
            stats = run.finish(time.perf_counter() - start)
    return JobResult(out.url, stats, signals.received)


def open_output(out: OutputDir, fingerprint: dict[str, Any], force: bool) -> dict[str, Any]:
    """The manifest of OUT for this job: a new one, the matching one (repaired), or a refusal."""
    manifest = out.read_manifest()
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        if not force:
            changes = "\n  ".join(fingerprint_diff(manifest["fingerprint"], fingerprint))
            raise JobConflict(f"{out.url} holds the output of a different job:\n  {changes}\n"
                              "Rerun with --force to delete that output and start over, or set another output.path.")
        logger.warning("--force: deleting the previous job's output in %s", out.url)
        out.reset()
        manifest = None
    if manifest is None:
        foreign = out.foreign_files()
        if foreign:
            raise JobConflict(f"{out.url} already holds files batchgen did not write ({', '.join(foreign[:3])}); "
                              "set output.path to a new or empty directory")
        manifest = {"fingerprint": fingerprint}
        out.write_manifest(manifest)
    rolled, removed = out.recover()
    if rolled or removed:
        logger.info("repaired an interrupted commit in %s: %d part(s) completed, %d uncommitted file(s) removed",
                    out.url, rolled, removed)
    manifest.pop("version", None)
    return manifest


class _Run:
    def __init__(self, spec: JobSpec, engine: Any, out: OutputDir, manifest: dict[str, Any], reader: Reader,
                 done: RowSet, signals: StopSignals, quiet: bool):
        self.spec = spec
        self.engine = engine
        self.out = out
        self.manifest = manifest
        self.reader = reader
        self.signals = signals
        self.planner = Planner(engine.tokenizer, engine.max_model_len, spec)
        # Enough queued work that the scheduler can always fill a batch, little enough to stay small.
        self.max_in_flight = 2 * engine.config.max_num_seqs
        self.progress = Progress(manifest.get("total_rows"), len(done), quiet, engine.stats)
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
            schema = self._schema(first)
            self.writer = PartWriter(self.out, schema, self.spec.output.commit_every_rows,
                                     self.spec.output.commit_every_seconds)
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

    def _schema(self, first: list[Planned]) -> OutputSchema:
        if self.manifest.get("schema"):
            return OutputSchema.from_json(self.manifest["schema"])
        schema = OutputSchema.for_job(self.spec, self.reader.arrow_schema(), [p.row for p in first])
        self.manifest["schema"] = schema.to_json()
        self.out.write_manifest(self.manifest)
        return schema

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
                self.engine.add_request(item.row.request_id, item.token_ids.tolist(), item.params)
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
            return JobFailed(f"row {row.id!r} ({self.reader.shards[row.shard].name}, row {row.index}): {error}\n"
                             "on_error is fail: the job stopped before generating that row's window; "
                             "rows finished before it are committed")
        if self.spec.on_error == "skip":
            self.writer.skip(row)
        else:
            self.writer.add(schema.failure(row, error, num_prompt_tokens))
        return None

    def finish(self, wall_time: float) -> dict[str, Any]:
        """Write _batchgen/stats.json for this run and the job so far; return it."""
        engine_stats = self.engine.stats()
        run = dict(self.writer.committed) if self.writer else dict.fromkeys(COUNTERS, 0)
        # Throughput over the generation loop: a model load is a fixed cost, not a rate.
        loop = max(self.loop_seconds, 1e-9)
        run.update(wall_time_s=wall_time, generation_time_s=self.loop_seconds,
                   rows_per_s=(run["rows"] + run["skipped"]) / loop,
                   output_tokens_per_s=run["generated_tokens"] / loop,
                   prefix_cache_hit_rate=engine_stats.get("prefix_cache_hit_rate", 0.0),
                   engine=engine_stats)
        records = self.out.records()
        if self.exhausted and self.manifest.get("total_rows") is None:
            # An input too costly to count up front (a remote JSONL file) is counted by reading it once.
            self.manifest["total_rows"] = job_totals(records, None)["rows_done"]
            self.out.write_manifest(self.manifest)
        job = job_totals(records, self.manifest.get("total_rows"))
        sig = self.signals.received
        stats = {"output": self.out.url, "interrupted": signal.Signals(sig).name if sig else None,
                 "run": run, "job": job}
        self.out.write_stats(stats)
        return stats
