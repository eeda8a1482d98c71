"""Array jobs: which share of the rows this process takes, and where its output goes.

A job split into N tasks (a Slurm array, or N runs by hand) gives task i the rows with
`(shard index + row index) % N == i` (reader.RowShare): a deterministic split by row, so one big
shard spreads over every task, and a requeued task gets exactly the same rows again.

The task comes from, first that is set: --task-index/--num-tasks, the job file's
`sharding: {task_index, num_tasks}`, and inside a Slurm array SLURM_ARRAY_TASK_ID (relative to
SLURM_ARRAY_TASK_MIN, in steps of SLURM_ARRAY_TASK_STEP) and SLURM_ARRAY_TASK_COUNT. When the task
count is given but not the index, the array id is used as the index: relative to the array's
start when the array has that many tasks, as is otherwise (so `sbatch --array=3 job.sbatch` reruns
task 3 alone). `--num-tasks 1` opts a run inside an array out of sharding (each task its own job).

Output layout. One task: OUT is the output directory itself. N > 1 tasks:

    OUT/_batchgen/array.json      {"num_tasks": N, "fingerprint": ...}: what OUT holds
    OUT/task-00000/               task 0's own output directory (parts, _batchgen/ manifest, commits)
    OUT/task-00001/ ...

so tasks never write the same file, each resumes from its own manifest, and pyarrow.dataset(OUT)
reads every task's parts. The task count is part of what OUT holds: once a row is committed, a run
with another count is refused (rows would land in other tasks' shares), unless --force.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchgen.job import store
from batchgen.job.fingerprint import fingerprint_diff
from batchgen.job.manifest import OutputDir, job_totals, json_bytes
from batchgen.job.reader import RowShare
from batchgen.job.spec import JobSpecError, ShardingSpec, parse_data_parallel

logger = logging.getLogger("batchgen")

ARRAY_FILE = "array.json"
SLURM_FILE = "slurm.json"  # written by `batchgen slurm`: the script, so status can say how to rerun tasks
_TASK_DIR = re.compile(r"^task-(\d{5,})$")


class JobConflict(RuntimeError):
    """The output directory belongs to a different job, task count (or to no job at all)."""


@dataclass(frozen=True)
class Task:
    index: int = 0
    count: int = 1
    source: str = ""  # where index/count came from, for messages

    @property
    def share(self) -> RowShare:
        return RowShare(self.index, self.count)

    @property
    def is_array(self) -> bool:
        return self.count > 1

    def describe(self) -> str:
        if not self.is_array:
            return "a single task"
        return f"task {self.index} of {self.count}" + (f" ({self.source})" if self.source else "")


SINGLE = Task()


def task_dir_name(index: int) -> str:
    return f"task-{index:05d}"


def task_url(url: str, index: int) -> str:
    return f"{url.rstrip('/')}/{task_dir_name(index)}"


# ---- which task am I ----------------------------------------------------------------------------

def resolve_task(sharding: ShardingSpec | None = None, task_index: int | None = None,
                 num_tasks: int | None = None, environ: Mapping[str, str] | None = None) -> Task:
    """The task of this run (see the module docstring for the order of sources). Raises JobSpecError."""
    sharding = sharding or ShardingSpec()
    env = os.environ if environ is None else environ
    sources = []
    count, index = num_tasks, task_index
    if count is not None:
        sources.append("--num-tasks")
    elif sharding.num_tasks is not None:
        count = sharding.num_tasks
        sources.append("sharding.num_tasks")
    if index is not None:
        sources.append("--task-index")
    elif sharding.task_index is not None:
        index = sharding.task_index
        sources.append("sharding.task_index")
    wants_env = count is None or (index is None and count > 1)  # an explicit count of 1 opts out
    if wants_env and env.get("SLURM_ARRAY_TASK_ID", "").strip():
        slurm_index, slurm_count, slurm_relative = _slurm_array(env)
        if count is None:
            count = slurm_count
            sources.append("SLURM_ARRAY_TASK_COUNT")
            if index is None:
                index = slurm_relative
                sources.append("SLURM_ARRAY_TASK_ID")
        elif index is None:
            # A full array of `count` tasks counts from its start; a partial one (a rerun of some
            # tasks: sbatch --array=3,5) names the tasks by their ids.
            index = slurm_relative if slurm_count == count else slurm_index
            sources.append("SLURM_ARRAY_TASK_ID")
    if count is None:
        if index not in (None, 0):
            raise JobSpecError(f"task index {index} needs a task count: --num-tasks or sharding.num_tasks")
        return SINGLE
    if not isinstance(count, int) or count < 1:
        raise JobSpecError(f"the task count must be an integer >= 1, got {count!r}")
    if index is None:
        if count == 1:
            return SINGLE
        raise JobSpecError(f"{count} tasks but no task index: pass --task-index I (0 <= I < {count}), set "
                           "sharding.task_index, or run inside a Slurm array (SLURM_ARRAY_TASK_ID)")
    if not 0 <= index < count:
        raise JobSpecError(f"task index {index} is outside [0, {count}) (from {', '.join(sources)}); a Slurm array "
                           f"for {count} tasks is --array=0-{count - 1}")
    return Task(index, count, ", ".join(sources)) if count > 1 else SINGLE


def _slurm_array(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT, the id's position in the array)."""
    def number(name: str, default: int | None = None) -> int:
        text = env.get(name, "").strip()
        if not text:
            if default is None:
                raise JobSpecError(f"{name} is not set, but SLURM_ARRAY_TASK_ID is")
            return default
        try:
            return int(text)
        except ValueError:
            raise JobSpecError(f"{name}={text!r} is not an integer") from None

    task_id = number("SLURM_ARRAY_TASK_ID")
    count = number("SLURM_ARRAY_TASK_COUNT")
    first = number("SLURM_ARRAY_TASK_MIN", task_id)
    step = max(number("SLURM_ARRAY_TASK_STEP", 1), 1)
    offset, rem = divmod(task_id - first, step)
    if rem or not 0 <= offset < count:
        raise JobSpecError(f"SLURM_ARRAY_TASK_ID={task_id} is not one of {count} evenly spaced tasks from "
                           f"SLURM_ARRAY_TASK_MIN={first}: use --array=0-{count - 1}, or pass --task-index and "
                           "--num-tasks")
    return task_id, count, offset


# ---- data parallel --------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries for its workers."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: a CPU machine
        n = 0
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None and declared.strip():
        entries = [e.strip() for e in declared.split(",") if e.strip()]
        return entries[:n]
    return [str(i) for i in range(n)]


def resolve_data_parallel(value: int | str | None, device: str = "auto",
                          tensor_parallel_size: int = 1) -> tuple[int, list[str] | None]:
    """(number of engine processes, the GPU of each or None on CPU) for --data-parallel auto|N.
    With tensor parallelism an engine takes a group of tensor_parallel_size GPUs ("0,1"): GPUs // tp engines."""
    if tensor_parallel_size > 1 and device != "cpu":
        from batchgen.distributed.placement import group_gpus

        return group_gpus(resolve_data_parallel, value, visible_gpus(), tensor_parallel_size)
    try:
        value = parse_data_parallel(value)
    except ValueError as e:
        raise JobSpecError(f"data_parallel: {e}") from None
    if value is None:
        return 1, None
    gpus = [] if device == "cpu" else visible_gpus()
    if value == "auto":
        return (len(gpus), gpus) if len(gpus) > 1 else (1, None)
    if value == 1:
        return 1, None
    if gpus:
        if value > len(gpus):
            raise JobSpecError(f"data_parallel: {value} engine processes, but only {len(gpus)} GPU(s) are visible "
                               f"({', '.join(gpus)}); use auto or at most {len(gpus)}")
        return value, gpus[:value]
    return value, None  # CPU processes (each with its share of the cores)


# ---- the output layout ---------------------------------------------------------------------------

class OutputLayout:
    """What OUT holds: nothing yet, one task's output (a plain output directory), or an array's."""

    def __init__(self, url: str):
        self.url = url
        self.root = OutputDir(url)

    def read_array(self) -> dict[str, Any] | None:
        return self.root._read_json(store.join(self.root.meta, ARRAY_FILE))

    def write_array(self, num_tasks: int, fingerprint: dict[str, Any]) -> None:
        store.write_atomic(self.root.fs, store.join(self.root.meta, ARRAY_FILE),
                           json_bytes({"version": 1, "num_tasks": num_tasks, "fingerprint": fingerprint}))

    def read_slurm(self) -> dict[str, Any] | None:
        return self.root._read_json(store.join(self.root.meta, SLURM_FILE))

    def task_indices(self) -> list[int]:
        """Indices of the task directories present."""
        names = store.list_names(self.root.fs, self.root.root)
        return sorted(int(m.group(1)) for m in map(_TASK_DIR.match, names) if m)

    def task_output(self, index: int) -> OutputDir:
        return OutputDir(task_url(self.url, index))

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
        return {i: job_totals(self.task_output(i).records(), None)["rows_done"] for i in self.task_indices()}

    def clear(self, old_count: int, new: Task) -> None:
        """Remove what a run with another task count left that `new` would not reset on its own."""
        if old_count == 1:
            self.root.reset()
            return
        for i in self.task_indices():
            if not new.is_array or i >= new.count:  # tasks below new.count reset their own directory
                url = task_url(self.url, i)
                fs, path = store.open_store(url)
                if fs.exists(path):
                    try:
                        fs.rm(path, recursive=True)
                    except FileNotFoundError:
                        pass  # another task of the new array removed it first
        if not new.is_array:
            store.remove(self.root.fs, store.join(self.root.meta, ARRAY_FILE))

    def foreign_files(self) -> list[str]:
        """Visible entries of an array's OUT other than its task directories."""
        return [n for n in store.list_names(self.root.fs, self.root.root)
                if not n.startswith(("_", ".")) and not _TASK_DIR.match(n)]


def check_task_count(layout: OutputLayout, task: Task, force: bool) -> int | None:
    """Refuse a task count other than the one OUT was started with, once rows are committed.

    Returns the count OUT holds when it must be cleared first (nothing committed, or --force).
    """
    existing = layout.num_tasks()
    if existing is None or existing == task.count:
        return None
    committed = layout.committed(existing)
    rows = sum(committed.values())
    if rows and not force:
        raise JobConflict(count_change_message(layout.url, existing, committed, task))
    return existing


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


def open_task_output(url: str, fingerprint: dict[str, Any], task: Task, force: bool):
    """(OutputDir, manifest) of this task in OUT, after checking what OUT holds; see open_output."""
    layout = OutputLayout(url)
    old = check_task_count(layout, task, force)
    if old is not None:
        layout.clear(old, task)
    if not task.is_array:
        return layout.root, open_output(layout.root, fingerprint, force)
    array = layout.read_array()
    if array is not None and array["fingerprint"] != fingerprint and not force:
        changes = "\n  ".join(fingerprint_diff(array["fingerprint"], fingerprint))
        raise JobConflict(f"{url} holds the output of a different job:\n  {changes}\n"
                          "Rerun with --force to delete that output and start over, or set another output.path.")
    if array is None or array["fingerprint"] != fingerprint or array["num_tasks"] != task.count:
        foreign = layout.foreign_files()
        if foreign:
            raise JobConflict(f"{url} already holds files batchgen did not write ({', '.join(foreign[:3])}); "
                              "set output.path to a new or empty directory")
        layout.write_array(task.count, fingerprint)  # every task writes the same content: a race is harmless
    out = layout.task_output(task.index)
    return out, open_output(out, fingerprint, force, task={"index": task.index, "count": task.count})


def open_output(out: OutputDir, fingerprint: dict[str, Any], force: bool,
                task: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest of one output directory for this job: a new one, the matching one (repaired), or a refusal.

    task: {"index", "count"} for a task directory of an array, None for a single run's OUT.
    """
    manifest = out.read_manifest()
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        if not force:
            changes = "\n  ".join(fingerprint_diff(manifest["fingerprint"], fingerprint))
            raise JobConflict(f"{out.url} holds the output of a different job:\n  {changes}\n"
                              "Rerun with --force to delete that output and start over, or set another output.path.")
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
