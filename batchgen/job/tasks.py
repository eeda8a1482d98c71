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
with another count is refused (rows would land in other tasks' shares), unless --force. That
layout is owned by outdir.JobOutput; this module only says which task a process is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from batchgen.job.reader import RowShare
from batchgen.job.spec import JobSpecError, ShardingSpec, parse_data_parallel


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
