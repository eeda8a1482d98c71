"""The one owner of an output directory OUT: its layout, its task directories, their commit
records and parts, and the lease that keeps it to one run.

    OUT/_batchgen/array.json          an array job: {"num_tasks": N, "fingerprint": ...} (tasks.py)
    OUT/_batchgen/slurm.json          written by `batchgen slurm`: its script, for `status`
    OUT/task-00000/                   task 0's own directory (an OutputDir, manifest.py), in an array
    OUT/ (itself)                     the directory of a single run
    <directory>/_batchgen/lease.json  the run that holds the directory now (lease.py)

`run`, its data-parallel workers, `status`, `merge`, `validate` and `slurm` reach OUT's files only
through a JobOutput and the OutputDir objects it hands out. A run opens its task once
(`open_task`): it takes the lease first (before the model loads, and before the crash repair,
which must never touch a live run's pending parts), then checks what OUT holds, repairs an
interrupted commit and reads the commit records once, handing the committed row set on (to the
reader, to data-parallel workers) instead of each of them reading the records again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from batchgen.job import store
from batchgen.job.fingerprint import fingerprint_diff
from batchgen.job.lease import Lease, OutputBusy, describe
from batchgen.job.manifest import OutputDir, RowSet, job_totals, json_bytes
from batchgen.job.tasks import Task, task_dir_name

logger = logging.getLogger("batchgen")

ARRAY_FILE = "array.json"
SLURM_FILE = "slurm.json"
_TASK_DIR = re.compile(r"^task-(\d{5,})$")

__all__ = ["JobConflict", "JobOutput", "OpenTask", "OutputBusy"]


class JobConflict(RuntimeError):
    """The output directory belongs to a different job, task count (or to no job at all)."""


# A busy output is a conflict too: the CLI and callers that catch JobConflict refuse it alike.
class OutputInUse(JobConflict, OutputBusy):
    pass


@dataclass
class OpenTask:
    """This run's task directory, opened: held under its lease, repaired, its commit records read once."""
    dir: OutputDir
    manifest: dict[str, Any]
    done: RowSet  # rows committed (or skipped) by earlier runs
    lease: Lease


class JobOutput:
    """What OUT holds: nothing yet, one task's output (a plain output directory), or an array's."""

    def __init__(self, url: str):
        self.url = url
        self.root = OutputDir(url)  # OUT itself: a single run's directory, and the array's metadata
        self.fs = self.root.fs

    # ---- the array and slurm files ------------------------------------------------------------

    def read_array(self) -> dict[str, Any] | None:
        return self.root._read_json(store.join(self.root.meta, ARRAY_FILE))

    def write_array(self, num_tasks: int, fingerprint: dict[str, Any]) -> None:
        store.write_atomic(self.fs, store.join(self.root.meta, ARRAY_FILE),
                           json_bytes({"version": 1, "num_tasks": num_tasks, "fingerprint": fingerprint}))

    def read_slurm(self) -> dict[str, Any] | None:
        return self.root._read_json(store.join(self.root.meta, SLURM_FILE))

    def write_slurm(self, info: dict[str, Any]) -> None:
        store.write_atomic(self.fs, store.join(self.root.meta, SLURM_FILE), json_bytes(info))

    # ---- directories ----------------------------------------------------------------------------

    def task_indices(self) -> list[int]:
        """Indices of the task directories present."""
        names = store.list_names(self.fs, self.root.root)
        return sorted(int(m.group(1)) for m in map(_TASK_DIR.match, names) if m)

    def task_url(self, index: int) -> str:
        return f"{self.url.rstrip('/')}/{task_dir_name(index)}"

    def task_dir(self, index: int) -> OutputDir:
        return OutputDir(self.task_url(index))

    def dir_of(self, task: Task) -> OutputDir:
        return self.task_dir(task.index) if task.is_array else self.root

    @staticmethod
    def worker_dir(url: str) -> OutputDir:
        """A data-parallel worker's handle on its parent's task directory (the parent holds the lease)."""
        return OutputDir(url)

    def lease(self, directory: OutputDir) -> Lease:
        return Lease(directory.fs, directory.meta, directory.url)

    def running(self, directory: OutputDir) -> dict[str, Any] | None:
        """The live run holding `directory` (its lease: host, pid, started, heartbeat), or None."""
        holder = self.lease(directory).live_holder()
        return None if holder is None else {k: holder.get(k) for k in ("host", "pid", "started", "heartbeat")}

    def num_tasks(self) -> int | None:
        """The task count OUT was started with; None when it holds nothing of batchgen's."""
        array = self.read_array()
        if array is not None:
            return int(array["num_tasks"])
        if self.root.read_manifest() is not None:
            return 1
        return None

    def committed(self, num_tasks: int) -> dict[int, int]:
        """Rows committed per task (0 for one task), counting from the commit records."""
        if num_tasks == 1:
            return {0: job_totals(self.root.records(), None)["rows_done"]}
        return {i: job_totals(self.task_dir(i).records(), None)["rows_done"] for i in self.task_indices()}

    def foreign_files(self) -> list[str]:
        """Visible entries of an array's OUT other than its task directories."""
        return [n for n in store.list_names(self.fs, self.root.root)
                if not n.startswith(("_", ".")) and not _TASK_DIR.match(n)]

    def clear(self, old_count: int, new: Task) -> None:
        """Remove what a run with another task count left that `new` would not reset on its own.

        Refuses (OutputInUse) to remove a directory that a live run holds.
        """
        if old_count == 1:
            self._refuse_if_held(self.root)
            self.root.reset()
            return
        doomed = [i for i in self.task_indices() if not new.is_array or i >= new.count]
        for i in doomed:  # tasks below new.count reset their own directory
            self._refuse_if_held(self.task_dir(i))
        for i in doomed:
            fs, path = store.open_store(self.task_url(i))
            if fs.exists(path):
                with contextlib.suppress(FileNotFoundError):  # another task of the new array removed it first
                    fs.rm(path, recursive=True)
        if not new.is_array:
            store.remove(self.fs, store.join(self.root.meta, ARRAY_FILE))

    def _refuse_if_held(self, directory: OutputDir) -> None:
        holder = self.lease(directory).live_holder()
        if holder is not None:
            raise OutputInUse(f"{directory.url} is in use by another batchgen run ({describe(holder)}); "
                              "it cannot be cleared while that run holds it")

    # ---- opening a task for a run -----------------------------------------------------------------

    def check_task_count(self, task: Task, force: bool) -> int | None:
        """Refuse a task count other than the one OUT was started with, once rows are committed.

        Returns the count OUT holds when it must be cleared first (nothing committed, or --force).
        """
        existing = self.num_tasks()
        if existing is None or existing == task.count:
            return None
        committed = self.committed(existing)
        if sum(committed.values()) and not force:
            raise JobConflict(count_change_message(self.url, existing, committed, task))
        return existing

    @contextlib.contextmanager
    def open_task(self, task: Task, fingerprint: dict[str, Any], force: bool) -> Iterator[OpenTask]:
        """Hold this task's directory for one run: lease, checks, crash repair, committed rows.

        Raises OutputInUse (another live run holds it) or JobConflict (another job's output).
        The lease is given back when the block ends, however it ends.
        """
        directory = self.dir_of(task)
        lease = self.lease(directory)
        try:
            lease.acquire()
        except OutputBusy as e:
            raise OutputInUse(str(e)) from None
        directory.lease = lease
        try:
            manifest = self._open_manifest(directory, task, fingerprint, force)
            yield OpenTask(directory, manifest, directory.committed_rows(), lease)
        finally:
            directory.lease = None
            lease.release()
            if task.is_array:
                _drop_if_empty(directory)

    def _open_manifest(self, out: OutputDir, task: Task, fingerprint: dict[str, Any], force: bool) -> dict[str, Any]:
        old = self.check_task_count(task, force)
        if old is not None:
            self.clear(old, task)
        if not task.is_array:
            return open_manifest(out, fingerprint, force)
        array = self.read_array()
        if array is not None and array["fingerprint"] != fingerprint and not force:
            raise JobConflict(different_job(self.url, array["fingerprint"], fingerprint))
        if array is None or array["fingerprint"] != fingerprint or array["num_tasks"] != task.count:
            foreign = self.foreign_files()
            if foreign:
                raise JobConflict(f"{self.url} already holds files batchgen did not write ({', '.join(foreign[:3])}); "
                                  "set output.path to a new or empty directory")
            self.write_array(task.count, fingerprint)  # every task writes the same content: a race is harmless
        return open_manifest(out, fingerprint, force, task={"index": task.index, "count": task.count})

    # ---- reading (status, merge) ------------------------------------------------------------------

    def directories(self) -> list[tuple[int | None, OutputDir]]:
        """(task index or None for a single run, its directory) for each of the job's directories."""
        array = self.read_array()
        if array is None:
            return [(None, self.root)]
        return [(i, self.task_dir(i)) for i in range(int(array["num_tasks"]))]


def _drop_if_empty(directory: OutputDir) -> None:
    """Remove a task directory that only the lease created (the run was refused before writing)."""
    if store.is_local(directory.fs) and directory.read_manifest() is None:
        for path in (directory.meta, directory.root):
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                os.rmdir(path)


def open_manifest(out: OutputDir, fingerprint: dict[str, Any], force: bool,
                  task: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest of one output directory for this job: a new one, the matching one (repaired), or a refusal.

    task: {"index", "count"} for a task directory of an array, None for a single run's OUT.
    """
    manifest = out.read_manifest()
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        if not force:
            raise JobConflict(different_job(out.url, manifest["fingerprint"], fingerprint))
        logger.warning("--force: deleting the previous job's output in %s", out.url)
        out.reset()
        manifest = None
    if manifest is not None and manifest.get("task") != task:
        # A task directory of an array with another task count; check_task_count has made sure that
        # nothing of it is committed (or --force was given).
        out.reset()
        manifest = None
    if manifest is None:
        foreign = out.foreign_files()
        if foreign:
            raise JobConflict(f"{out.url} already holds files batchgen did not write ({', '.join(foreign[:3])}); "
                              "set output.path to a new or empty directory")
        manifest = {"fingerprint": fingerprint, **({"task": task} if task is not None else {})}
        out.write_manifest(manifest)
    rolled, removed = out.recover()
    if rolled or removed:
        logger.info("repaired an interrupted commit in %s: %d part(s) completed, %d uncommitted file(s) removed",
                    out.url, rolled, removed)
    manifest.pop("version", None)
    return manifest


def different_job(url: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = "\n  ".join(fingerprint_diff(old, new))
    return (f"{url} holds the output of a different job:\n  {changes}\n"
            "Rerun with --force to delete that output and start over, or set another output.path.")


def count_change_message(url: str, existing: int, committed: dict[int, int], task: Task) -> str:
    rows = sum(committed.values())
    if existing == 1:
        held = f"the output of a single run, not of an array ({rows} rows committed)"
        same = "run it without --num-tasks/sharding (outside a Slurm array, or with --num-tasks 1)"
    else:
        by = ", ".join(str(i) for i, n in sorted(committed.items()) if n)
        held = f"the output of an array of {existing} tasks ({rows} rows committed, by task(s) {by})"
        same = f"run the same {existing} tasks (--num-tasks {existing}, or sbatch --array=0-{existing - 1})"
    this = task.describe() if task.is_array else "a single run (1 task)"
    return (f"{url} holds {held}; this run is {this}.\n"
            "Rows are shared out by task count, so the count cannot change once rows are committed: "
            f"{same}, set another output.path, or add --force to delete that output and start over.")

