"""Data parallel: one engine process per GPU, over disjoint parts of one task's rows.

`batchgen run job.yaml --data-parallel auto` on a node with several GPUs (one array task per node)
runs here. The parent process has opened the task's output directory as any run does (checked
what it holds, repaired an interrupted commit, counted the rows) and fixes the output schema; then
it starts worker j of d (`python -m batchgen.job.parallel`, CUDA_VISIBLE_DEVICES set to its GPU),
which takes the rows of the task's share with ((shard + row) // num_tasks) % d == j, that is
RowShare(task + num_tasks * j, num_tasks * d): a sub-share of the task's share.

Workers commit into the task's output directory (commit names are unique per process; a worker
never runs the crash repair, the parent did), never write its manifest or stats, and send progress
and their run statistics to the parent as JSON lines on stdout. The number of workers may change
between runs (a requeue onto a node with other GPUs): every worker skips the rows committed by any
earlier run, so each row is still written exactly once.

Signals: the parent forwards the first SIGTERM/SIGINT to its workers (which ignore repeats: the
proctrack of a batch system often signals them directly too); they stop admitting rows and commit.
A second signal to the parent kills the workers and exits at once.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

from batchgen.job.manifest import COUNTERS, OutputDir
from batchgen.job.progress import postfix
from batchgen.job.reader import Reader, RowShare
from batchgen.job.signals import StopSignals
from batchgen.job.spec import JobSpec, JobSpecError

logger = logging.getLogger("batchgen")

_REPORT_S = 0.5


class WorkerFailed(RuntimeError):
    """A data-parallel worker process died (a crash, the OOM killer): what was committed stays."""


def run_parallel(spec: JobSpec, out: OutputDir, manifest: dict[str, Any], reader: Reader, done_before: int, task,
                 workers: int, gpus: list[str] | None, signals: StopSignals, quiet: bool,
                 start: float) -> dict[str, Any]:
    """Run `workers` engine processes over the task's rows; write and return the aggregated stats."""
    from batchgen.job.runner import JobFailed, ensure_schema, write_stats

    for url in (out.url, *(s.url for s in reader.shards)):
        if url.startswith("memory://"):
            raise JobSpecError(f"data_parallel: {url} is in this process's memory, which worker processes "
                               "cannot reach; use a local or remote path")
    if not manifest.get("schema"):
        # Fixed once here, as a single run fixes it from its first window: all workers write one schema.
        needs_rows = spec.output.keep_columns != "none" and reader.arrow_schema() is None
        first = list(itertools.islice(iter(reader), spec.input.group_window)) if needs_rows else []
        if first or not needs_rows:
            ensure_schema(spec, out, manifest, reader, first)
    logger.info("data parallel: %d engine processes (%s) over %s", workers,
                f"GPUs {', '.join(gpus)}" if gpus else "CPU", out.url)

    procs: list[subprocess.Popen] = []
    messages: queue.Queue = queue.Queue()
    cpu_threads = max(1, (os.cpu_count() or 1) // workers)
    for j in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[j]
        else:
            env.setdefault("OMP_NUM_THREADS", str(cpu_threads))  # share the cores instead of fighting over them
        payload = {"spec": spec, "output": out.url, "manifest": manifest, "shards": reader.shards,
                   "share": (task.index + task.count * j, task.count * workers), "worker": j, "workers": workers,
                   "quiet": quiet, "parent": os.getpid()}
        proc = subprocess.Popen([sys.executable, "-m", "batchgen.job.parallel"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)
        proc.stdin.write(pickle.dumps(payload))
        proc.stdin.close()
        procs.append(proc)
        threading.Thread(target=_read_messages, args=(j, proc.stdout, messages), daemon=True).start()

    def kill_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()

    signals.on_exit = kill_all
    bar = tqdm(total=manifest.get("total_rows"), initial=done_before, unit="row", disable=quiet,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
    finals: dict[int, dict[str, Any]] = {}
    latest: dict[int, dict[str, Any]] = {}
    open_streams, forwarded, stopping = workers, False, False
    loop_start = None  # from the first progress report: model loading is not generation
    try:
        while open_streams:
            try:
                j, msg = messages.get(timeout=0.2)
            except queue.Empty:
                msg = j = None
            if msg == "eof":
                open_streams -= 1
            elif isinstance(msg, dict) and "rows" in msg:
                bar.update(msg["rows"])
                latest[j] = msg["engine"]
                loop_start = loop_start or time.perf_counter() - _REPORT_S
                tokens = sum(e.get("generated_tokens", 0) for e in latest.values())
                bar.set_postfix_str(postfix(tokens / max(time.perf_counter() - loop_start, 1e-9), _mean(latest)),
                                    refresh=False)
            elif isinstance(msg, dict) and "final" in msg:
                finals[j] = msg
                if msg.get("failed") and not stopping:  # on_error: fail in one worker stops the task
                    stopping = True
                    _signal_all(procs, 15)
            if signals.received is not None and not forwarded:
                forwarded = True
                _signal_all(procs, signals.received)
        for p in procs:
            p.wait()
    except BaseException:
        kill_all()
        raise
    finally:
        bar.close()
        signals.on_exit = None
        run = _aggregate([finals[j]["run"] for j in sorted(finals)], workers, time.perf_counter() - start)
        exhausted = len(finals) == workers and all(f["exhausted"] for f in finals.values())
        stats = write_stats(out, manifest, run, exhausted, signals.received)
    failed = [f["failed"] for f in finals.values() if f.get("failed")]
    if failed:
        raise JobFailed(failed[0])
    crashed = [(j, p.returncode) for j, p in enumerate(procs) if j not in finals or p.returncode not in (0, 1)]
    if crashed:
        j, code = crashed[0]
        where = f"GPU {gpus[j]}" if gpus else "CPU"
        raise WorkerFailed(f"data-parallel worker {j} ({where}) exited with code {code} (its log is above); "
                           "rows committed so far are kept: rerun to resume")
    return stats


def _read_messages(j: int, stream, messages: queue.Queue) -> None:
    for line in stream:
        try:
            messages.put((j, json.loads(line)))
        except ValueError:
            continue  # not ours
    messages.put((j, "eof"))


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
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


# ---- the worker process ---------------------------------------------------------------------------

class _Reporter:
    """The worker's progress: rows finished and a few engine numbers, as JSON lines to the parent."""

    def __init__(self, channel, engine_stats):
        self.channel = channel
        self.engine_stats = engine_stats
        self.pending = 0
        self.last = 0.0

    def advance(self, rows: int) -> None:
        self.pending += rows
        now = time.monotonic()
        if self.pending and now - self.last >= _REPORT_S:
            self.flush()
            self.last = now

    def flush(self) -> None:
        s = self.engine_stats()
        _send(self.channel, {"rows": self.pending, "engine": {
            k: s[k] for k in ("generated_tokens", "prefix_cache_hit_rate", "spec_acceptance_rate") if k in s}})
        self.pending = 0

    def close(self) -> None:
        if self.pending:
            self.flush()


def _send(channel, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def _worker() -> int:
    from batchgen.job.runner import JobFailed, _Run

    payload = pickle.load(sys.stdin.buffer)
    _die_with_parent(payload["parent"])
    # stdout is the channel to the parent: anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    j = payload["worker"]
    logging.basicConfig(level=logging.WARNING if payload["quiet"] else logging.INFO, stream=sys.stderr,
                        format=f"%(name)s[worker {j}]: %(message)s")
    spec: JobSpec = payload["spec"]
    out = OutputDir(payload["output"])
    start = time.perf_counter()
    failed = None
    run = None
    with StopSignals(repeat_exits=False) as signals:
        done = out.committed_rows()
        reader = Reader(payload["shards"], spec.input, columns=spec.read_columns, share=RowShare(*payload["share"]),
                        skip=done.contains)
        from batchgen.engine import Engine

        engine = Engine(spec.engine_config())
        run = _Run(spec, engine, out, payload["manifest"], reader, done, signals, _Reporter(channel, engine.stats),
                   record_extra={"worker": j, "workers": payload["workers"]})
        try:
            run.execute()
        except JobFailed as e:
            failed = str(e)
        finally:
            _send(channel, {"final": True, "run": run.run_stats(time.perf_counter() - start),
                            "exhausted": run.exhausted, "failed": failed})
    return 1 if failed else 0


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its parent: a rerun would start new workers beside it on the same rows."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


if __name__ == "__main__":
    sys.exit(_worker())
