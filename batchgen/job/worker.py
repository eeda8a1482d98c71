"""A data-parallel worker process (`python -m batchgen.job.worker`, started by parallel.py).

It reads its payload (the job, its share of the rows, the rows committed before it started) from
stdin, runs the generation loop of runner.py over that share and commits into its parent's task
directory. stdout is its channel to the parent: JSON lines of progress and one final report.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import time
from typing import Any

from batchgen.job.outdir import JobOutput
from batchgen.job.parallel import REPORT_S
from batchgen.job.reader import Reader, RowShare
from batchgen.job.runner import JobFailed, _Run
from batchgen.job.signals import StopSignals
from batchgen.job.spec import JobSpec


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
        if self.pending and now - self.last >= REPORT_S:
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


def main() -> int:
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
    out = JobOutput.worker_dir(payload["output"])
    done = payload["done"]  # read by the parent: the worker never reads the commit records itself
    start = time.perf_counter()
    failed = None
    with StopSignals(repeat_exits=False) as signals:
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
    sys.exit(main())
