"""Data parallel: one engine process per GPU, over disjoint parts of one task's rows.

`batchgen run job.yaml --data-parallel auto` on a node with several GPUs (one array task per node)
runs here. The parent process (runner.py) has opened the task's output directory as any run does
(holds its lease, checked what it holds, repaired an interrupted commit, read the committed rows)
and fixed the output schema; then it starts worker j of d (`python -m batchgen.job.worker`,
CUDA_VISIBLE_DEVICES set to its GPU), which takes the rows of the task's share with
((shard + row) // num_tasks) % d == j, that is RowShare(task + num_tasks * j, num_tasks * d): a
sub-share of the task's share.

Workers commit into the task's output directory (commit names are unique per process; a worker
never runs the crash repair, the parent does once they are gone), never write its manifest or
stats, and send progress and their run statistics to the parent as JSON lines on stdout. The rows
committed before they start are handed to them with their payload, so no worker reads the commit
records. The number of workers may change between runs (a requeue onto a node with other GPUs):
every worker skips the rows committed by any earlier run, so each row is still written exactly once.

A worker that dies (kill -9, the OOM killer, a crash: it exits without its final report) is
started again on the same share, up to sharding.max_worker_restarts times: the parent reads the
commit records again, so the new worker skips what its predecessor committed and redoes only the
rest. A commit the dead worker left half done is harmless meanwhile (a record whose part is still
pending counts as committed; a part without a record is invisible) and is repaired when all workers
have ended. Past the limit the other workers are asked to stop, and the task fails naming the
worker and how it died; what was committed stays.

Signals: the parent forwards the first SIGTERM/SIGINT to its workers (which ignore repeats: the
proctrack of a batch system often signals them directly too); they stop admitting rows and commit.
A second signal to the parent kills the workers and exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from batchgen.job.manifest import COUNTERS, OutputDir, RowSet
from batchgen.job.progress import postfix
from batchgen.job.signals import StopSignals
from batchgen.job.spec import JobSpec, JobSpecError

logger = logging.getLogger("batchgen")

REPORT_S = 0.5


class WorkerFailed(RuntimeError):
    """A data-parallel worker process died more often than it may be restarted: what was committed stays."""


@dataclass
class WorkersResult:
    run: dict[str, Any]  # stats.json's "run" entry, summed over the workers
    exhausted: bool  # every worker read and finished its whole share
    failed: str | None = None  # on_error: fail met a bad row in a worker (its message)
    gave_up: str | None = None  # a worker died past the restart limit (what happened)
    restarts: dict[int, int] = field(default_factory=dict)

    def raise_for_crash(self) -> None:
        if self.gave_up:
            raise WorkerFailed(self.gave_up)


def empty_run(workers: int, wall_time: float) -> dict[str, Any]:
    return _aggregate([], workers, wall_time)


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = " (the OOM killer, or kill -9)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {code} without finishing (its log is above)"


def run_workers(spec: JobSpec, out: OutputDir, manifest: dict[str, Any], shards: list, done: RowSet, task,
                workers: int, gpus: list[str] | None, signals: StopSignals, quiet: bool,
                start: float) -> WorkersResult:
    """Run `workers` engine processes over the task's rows, restarting any that dies; their summed stats."""
    for url in (out.url, *(s.url for s in shards)):
        if url.startswith("memory://"):
            raise JobSpecError(f"data_parallel: {url} is in this process's memory, which worker processes "
                               "cannot reach; use a local or remote path")
    max_restarts = spec.sharding.max_worker_restarts
    logger.info("data parallel: %d engine processes (%s) over %s", workers,
                f"GPUs {', '.join(gpus)}" if gpus else "CPU", out.url)

    messages: queue.Queue = queue.Queue()
    cpu_threads = max(1, (os.cpu_count() or 1) // workers)
    procs: dict[int, subprocess.Popen] = {}
    generation: dict[int, int] = {}  # worker -> how many times it was started; messages carry it

    def launch(j: int, committed: RowSet) -> None:
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[j]
        else:
            env.setdefault("OMP_NUM_THREADS", str(cpu_threads))  # share the cores instead of fighting over them
        payload = {"spec": spec, "output": out.url, "manifest": manifest, "shards": shards, "done": committed,
                   "share": (task.index + task.count * j, task.count * workers), "worker": j, "workers": workers,
                   "quiet": quiet, "parent": os.getpid()}
        proc = subprocess.Popen([sys.executable, "-m", "batchgen.job.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        proc.stdin.write(pickle.dumps(payload))
        proc.stdin.close()
        procs[j] = proc
        generation[j] = generation.get(j, -1) + 1
        threading.Thread(target=_read_messages, args=((j, generation[j]), proc.stdout, messages),
                         daemon=True).start()

    for j in range(workers):
        launch(j, done)

    def kill_all() -> None:
        for p in procs.values():
            if p.poll() is None:
                p.kill()

    signals.on_exit = kill_all
    bar = tqdm(total=manifest.get("total_rows"), initial=len(done), unit="row", disable=quiet,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
    finals: dict[int, dict[str, Any]] = {}
    latest: dict[int, dict[str, Any]] = {}
    running = set(range(workers))
    forwarded, stopping, gave_up = False, False, None
    restarts: dict[int, int] = {}
    loop_start = None  # from the first progress report: model loading is not generation
    try:
        while running:
            try:
                (j, gen), msg = messages.get(timeout=0.2)
            except queue.Empty:
                (j, gen), msg = (None, None), None
            if j is not None and gen != generation[j]:
                msg = None  # a late line from a worker that was replaced
            if msg == "eof":
                code = procs[j].wait()
                running.discard(j)
                if j not in finals:  # died without its final report: killed, OOM, a crash
                    what = f"data-parallel worker {j} ({f'GPU {gpus[j]}' if gpus else 'CPU'}) {_death(code)}"
                    if stopping or signals.received is not None:
                        logger.warning("%s while stopping; its uncommitted rows run again on resume", what)
                    elif restarts.get(j, 0) < max_restarts:
                        restarts[j] = restarts.get(j, 0) + 1
                        logger.warning("%s; restarting it (%d of at most %d), its uncommitted rows run again",
                                       what, restarts[j], max_restarts)
                        latest.pop(j, None)
                        launch(j, out.committed_rows(out.records(refresh=True)))
                        running.add(j)
                    else:
                        gave_up = (f"{what}, {restarts.get(j, 0)} restart(s) allowed "
                                   f"(sharding.max_worker_restarts) and used; rows committed so far are kept: "
                                   "rerun to resume")
                        logger.error("%s", gave_up)
                        stopping = True
                        _signal_all(procs.values(), signal.SIGTERM)
            elif isinstance(msg, dict) and "rows" in msg:
                bar.update(msg["rows"])
                latest[j] = msg["engine"]
                loop_start = loop_start or time.perf_counter() - REPORT_S
                tokens = sum(e.get("generated_tokens", 0) for e in latest.values())
                bar.set_postfix_str(postfix(tokens / max(time.perf_counter() - loop_start, 1e-9), _mean(latest)),
                                    refresh=False)
            elif isinstance(msg, dict) and "final" in msg:
                finals[j] = msg
                if msg.get("failed") and not stopping:  # on_error: fail in one worker stops the task
                    stopping = True
                    _signal_all(procs.values(), signal.SIGTERM)
            if signals.received is not None and not forwarded:
                forwarded = True
                _signal_all(procs.values(), signals.received)
        for p in procs.values():
            p.wait()
    except BaseException:
        kill_all()
        raise
    finally:
        bar.close()
        signals.on_exit = None
    # A worker that died sent no statistics: this run's counters miss what it committed (the job's
    # totals, counted from the commit records, do not).
    run = _aggregate([finals[j]["run"] for j in sorted(finals)], workers, time.perf_counter() - start)
    run["worker_restarts"] = sum(restarts.values())
    exhausted = len(finals) == workers and all(f["exhausted"] for f in finals.values()) and gave_up is None
    failed = next((f["failed"] for f in finals.values() if f.get("failed")), None)
    return WorkersResult(run, exhausted, failed, gave_up, restarts)


def _read_messages(j: tuple[int, int], stream, messages: queue.Queue) -> None:
    for line in stream:
        try:
            messages.put((j, json.loads(line)))
        except ValueError:
            continue  # not ours
    messages.put((j, "eof"))


def _signal_all(procs, sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def _mean(latest: dict[int, dict[str, Any]]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for key in ("prefix_cache_hit_rate", "spec_acceptance_rate"):
        values = [e[key] for e in latest.values() if e.get(key) is not None]
        if values:
            stats[key] = sum(values) / len(values)
    return stats


def _aggregate(runs: list[dict[str, Any]], workers: int, wall_time: float) -> dict[str, Any]:
    """One "run" entry for stats.json from the workers' own."""
    run: dict[str, Any] = {k: sum(r.get(k, 0) for r in runs) for k in COUNTERS}
    loop = max((r.get("generation_time_s", 0.0) for r in runs), default=0.0)
    engines = [r.get("engine", {}) for r in runs]
    prompt = sum(e.get("prompt_tokens", 0) for e in engines)
    cached = sum(e.get("cached_prompt_tokens", 0) for e in engines)
    run.update(wall_time_s=wall_time, generation_time_s=loop,
               rows_per_s=(run["rows"] + run["skipped"]) / max(loop, 1e-9),
               output_tokens_per_s=run["generated_tokens"] / max(loop, 1e-9),
               prefix_cache_hit_rate=cached / prompt if prompt else 0.0)
    spec = [e for e in engines if "spec_acceptance_rate" in e]
    if spec:
        proposed = sum(e.get("spec_proposed_tokens", 0) for e in spec)
        accepted = sum(e.get("spec_accepted_tokens", 0) for e in spec)
        steps = sum(e.get("spec_steps", 0) for e in spec)
        positions = [e.get("spec_acceptance_per_position", []) for e in spec]
        width = max(map(len, positions), default=0)
        run.update(spec_acceptance_rate=accepted / proposed if proposed else 0.0,
                   spec_mean_accepted_length=(accepted + steps) / steps if steps else 0.0,
                   spec_acceptance_per_position=[
                       sum(p[i] for p in positions if i < len(p)) / max(1, sum(1 for p in positions if i < len(p)))
                       for i in range(width)])
    run.update(data_parallel=workers, engine={"workers": engines})
    return run
