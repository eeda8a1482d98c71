"""Array jobs without Slurm or a model: task shares, per-task output, resume, task-count changes,
status and merge across tasks, the sbatch script. An echo engine stands in for the model."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import main as cli
from batchgen.job.manifest import OutputDir
from batchgen.job.outdir import JobConflict
from batchgen.job.outputs import OutputError, merge_outputs, output_status
from batchgen.job.reader import RowShare
from batchgen.job.runner import run_job
from batchgen.job.spec import JobSpecError, ShardingSpec
from batchgen.job.tasks import Task, resolve_data_parallel, resolve_task
from batchgen.sampling import CompletionOutput, RequestOutput
from tests.job.conftest import write_job, write_jsonl


class EchoEngine:
    """Finishes every request in the step after it is added; can SIGTERM its own process at step k."""

    def __init__(self, tokenizer, term_at_step: int | None = None, crash_at_step: int | None = None):
        self.tokenizer = tokenizer
        self.max_model_len = 256
        self.config = SimpleNamespace(max_num_seqs=2)
        self.queue: list[tuple[str, list[int], str | None]] = []
        self.added: list[tuple[str, str | None]] = []
        self.steps = 0
        self.term_at_step = term_at_step
        self.crash_at_step = crash_at_step

    def add_request(self, request_id, token_ids, params, lora=None):
        self.queue.append((request_id, token_ids, lora))
        self.added.append((request_id, lora))

    def step(self):
        self.steps += 1
        if self.steps == self.term_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm does before a time limit or on preemption
        if self.steps == self.crash_at_step:
            raise RuntimeError("engine crashed")
        batch, self.queue = self.queue[:2], self.queue[2:]
        return [RequestOutput(rid, None, ids, [CompletionOutput(0, f"echo {lora}", [1, 2], "length")])
                for rid, ids, lora in batch]

    def abort_all(self):
        self.queue.clear()

    def stats(self):
        return {"generated_tokens": 2 * len(self.added), "prefix_cache_hit_rate": 0.0}


@pytest.fixture
def job_file(tmp_path):
    """Two shards: a big one (10 rows) and a small one (3 rows): 13 rows."""
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"id": f"a{i}", "prompt": f"A{i}"} for i in range(10)])
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"id": f"b{i}", "prompt": f"B{i}"} for i in range(3)])
    return write_job(tmp_path / "job.yaml", input={"path": "data/*.jsonl"},
                     output={"path": "out", "commit_every_rows": 1},
                     sampling={"max_tokens": 2})


def keys_of(url: str) -> list[tuple[int, int]]:
    table = pads.dataset(url).to_table()
    return sorted(zip(table["_shard_index"].to_pylist(), table["_row_index"].to_pylist()))


ALL_KEYS = sorted([(0, i) for i in range(10)] + [(1, i) for i in range(3)])


# ---- which task --------------------------------------------------------------------------------

SLURM = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4",
         "SLURM_ARRAY_TASK_STEP": "1"}


def test_the_task_comes_from_the_command_line_the_job_file_then_slurm():
    assert resolve_task(environ={}) == Task()
    t = resolve_task(ShardingSpec(), 2, 3, environ=SLURM)
    assert (t.index, t.count) == (2, 3)
    t = resolve_task(ShardingSpec(num_tasks=4, task_index=1), environ={})
    assert (t.index, t.count, t.source) == (1, 4, "sharding.num_tasks, sharding.task_index")
    t = resolve_task(environ=SLURM)  # id 7 in an array 5..8: the third task
    assert (t.index, t.count) == (2, 4) and "SLURM_ARRAY_TASK_ID" in t.source
    stepped = {**SLURM, "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_task(environ=stepped).index == 2
    # The count given, a full array counts from its start; a partial rerun (sbatch --array=3) names the task.
    assert resolve_task(ShardingSpec(num_tasks=4), environ=SLURM).index == 2
    rerun = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "1"}
    assert resolve_task(ShardingSpec(), None, 4, environ=rerun).index == 3
    # --num-tasks 1 opts out of sharding inside an array (each task its own job).
    assert resolve_task(ShardingSpec(), None, 1, environ=SLURM) == Task()


@pytest.mark.parametrize("args, env, message", [
    ((None, 3), {}, "3 tasks but no task index: pass --task-index"),
    ((2, None), {}, "task index 2 needs a task count"),
    ((3, 3), {}, r"task index 3 is outside \[0, 3\)"),
    ((None, 2), {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "1"},
     r"task index 3 is outside \[0, 2\)"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                    "SLURM_ARRAY_TASK_STEP": "1"}, "not one of 2 evenly spaced tasks"),
])
def test_task_errors_say_what_to_pass(args, env, message):
    with pytest.raises(JobSpecError, match=message):
        resolve_task(ShardingSpec(), *args, environ=env)


def test_data_parallel_auto_is_one_process_on_cpu():
    assert resolve_data_parallel("auto", "cpu") == (1, None)
    assert resolve_data_parallel(None, "auto") == (1, None)
    assert resolve_data_parallel(3, "cpu") == (3, None)


def test_sub_shares_of_a_task_partition_its_share():
    task, workers = RowShare(1, 3), 2
    subs = [RowShare(task.index + task.count * j, task.count * workers) for j in range(workers)]
    for shard in range(3):
        rows = [r for r in range(40) if task.takes(shard, r)]
        parts = [[r for r in range(40) if s.takes(shard, r)] for s in subs]
        assert sorted(parts[0] + parts[1]) == rows and not set(parts[0]) & set(parts[1])


# ---- array runs -----------------------------------------------------------------------------------

def test_each_task_writes_its_own_directory_and_the_tasks_cover_every_row_once(job_file, tokenizer, tmp_path):
    out = tmp_path / "out"
    for i in range(3):
        result = run_job(str(job_file), task_index=i, num_tasks=3, engine=EchoEngine(tokenizer), quiet=True)
        assert result.complete and result.output == str(out / f"task-{i:05d}")
        share = RowShare(i, 3)
        keys = keys_of(result.output)
        assert keys and all(share.takes(*k) for k in keys)
        assert result.stats["job"]["rows_total"] == len(keys) and result.stats["task"] == {"index": i, "count": 3}
    # The big shard is spread over all three tasks, not given to one.
    assert {k for k in keys_of(str(out / "task-00002")) if k[0] == 0}
    assert keys_of(str(out)) == ALL_KEYS  # pyarrow.dataset over OUT reads every task's parts
    st = output_status(str(out))
    assert st["complete"] and st["num_tasks"] == 3 and st["rows_done"] == st["rows_total"] == 13
    merged = tmp_path / "merged.parquet"
    totals = merge_outputs([str(out)], str(merged))
    assert totals["complete"] and pq.read_table(merged)["id"].to_pylist() == [f"a{i}" for i in range(10)] + [
        "b0", "b1", "b2"]


def test_a_stopped_task_resumes_from_its_own_manifest_exactly_once(job_file, tokenizer, tmp_path):
    out = tmp_path / "out"
    stopped = run_job(str(job_file), task_index=1, num_tasks=2, engine=EchoEngine(tokenizer, term_at_step=2),
                      quiet=True)
    assert stopped.exit_code == 143 and not stopped.complete
    first = keys_of(stopped.output)
    assert 0 < len(first) < 7
    other = run_job(str(job_file), task_index=0, num_tasks=2, engine=EchoEngine(tokenizer), quiet=True)
    assert other.complete  # a task of the array never touched task 1's files
    engine = EchoEngine(tokenizer)
    resumed = run_job(str(job_file), task_index=1, num_tasks=2, engine=engine, quiet=True)
    assert resumed.complete and resumed.stats["run"]["rows"] == 7 - len(first)
    assert {int(rid.split(":")[1]) for rid, _ in engine.added if rid.startswith("0:")}.isdisjoint(
        {k[1] for k in first if k[0] == 0})  # committed rows were not generated again
    assert keys_of(str(out)) == ALL_KEYS


def test_another_task_count_is_refused_once_rows_are_committed(job_file, tokenizer, tmp_path):
    out = tmp_path / "out"
    run_job(str(job_file), task_index=0, num_tasks=3, engine=EchoEngine(tokenizer), quiet=True)
    with pytest.raises(JobConflict, match=r"(?s)array of 3 tasks \(5 rows committed, by task\(s\) 0\); this run is "
                                          r"task 1 of 4.*cannot change once rows are committed.*--num-tasks 3"):
        run_job(str(job_file), task_index=1, num_tasks=4, engine=EchoEngine(tokenizer), quiet=True)
    with pytest.raises(JobConflict, match="this run is a single run"):
        run_job(str(job_file), engine=EchoEngine(tokenizer), quiet=True)
    # --force starts over with the new count.
    result = run_job(str(job_file), task_index=1, num_tasks=4, engine=EchoEngine(tokenizer), quiet=True, force=True)
    assert result.complete
    assert json.loads((out / "_batchgen" / "array.json").read_text())["num_tasks"] == 4
    assert output_status(str(out))["num_tasks"] == 4


def test_a_single_runs_output_refuses_an_array_and_an_empty_start_may_change_count(job_file, tokenizer, tmp_path):
    with pytest.raises(RuntimeError, match="engine crashed"):
        run_job(str(job_file), engine=EchoEngine(tokenizer, crash_at_step=1), quiet=True)
    out = OutputDir(str(tmp_path / "out"))
    assert out.read_manifest() is not None and not out.records()  # nothing committed yet
    # Nothing committed: the task count may still change.
    assert run_job(str(job_file), task_index=0, num_tasks=2, engine=EchoEngine(tokenizer), quiet=True).complete
    assert out.read_manifest() is None  # the single run's leftovers are gone
    single = tmp_path / "single.yaml"
    single.write_text(job_file.read_text().replace("path: out", "path: out1"))
    run_job(str(single), engine=EchoEngine(tokenizer), quiet=True)
    with pytest.raises(JobConflict, match="holds the output of a single run, not of an array"):
        run_job(str(single), task_index=0, num_tasks=2, engine=EchoEngine(tokenizer), quiet=True)


def test_status_and_merge_name_the_unfinished_tasks(job_file, tokenizer, tmp_path):
    out = str(tmp_path / "out")
    run_job(str(job_file), task_index=0, num_tasks=3, engine=EchoEngine(tokenizer), quiet=True)
    run_job(str(job_file), task_index=1, num_tasks=3, engine=EchoEngine(tokenizer, term_at_step=1), quiet=True)
    st = output_status(out)
    assert st["unfinished"] == [1, 2] and st["rows_total"] is None and not st["complete"]
    runner = CliRunner()
    text = runner.invoke(cli, ["status", out]).output
    assert "array of 3 tasks, incomplete" in text
    assert "task 0: complete, 5/5 rows" in text and "task 2: not started" in text
    assert "task 1: incomplete" in text and "stopped by SIGTERM" in text
    assert "unfinished: task(s) 1, 2; rerun to resume: batchgen run JOB --num-tasks 3 --task-index I for I in 1, 2" in text
    assert json.loads(runner.invoke(cli, ["status", "--json", out]).output)["unfinished"] == [1, 2]

    merged = str(tmp_path / "m.parquet")
    with pytest.raises(OutputError, match=r"task 1 \(\d/4 rows\), task 2 \(not started\).*--allow-partial"):
        merge_outputs([out], merged)
    refused = runner.invoke(cli, ["merge", out, "--to", merged])
    assert refused.exit_code == 1 and "task 2 (not started)" in refused.output and not os.path.exists(merged)
    partial = runner.invoke(cli, ["merge", out, "--to", merged, "--allow-partial"])
    assert partial.exit_code == 0 and "warning: the output is incomplete" in partial.output
    assert "task 2 (not started)" in partial.output
    assert pq.read_table(merged).num_rows == output_status(out)["rows_done"]


# ---- the sbatch script ------------------------------------------------------------------------------

def test_slurm_writes_an_array_script_that_resumes(job_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["slurm", str(job_file), "--tasks", "3", "--gpus-per-task", "0", "--cpus-per-task",
                                 "1", "--mem", "2G", "--time", "10", "--partition", "debug", "--grace", "60",
                                 "--set", "sampling.max_tokens=3"])
    assert result.exit_code == 0, result.output
    script = tmp_path / "out" / "_batchgen" / "job.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --array=0-2", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@60", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem=2G", "#SBATCH --time=10", "#SBATCH --partition=debug", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/out/_batchgen/logs/task-%a.log"):
        assert line in text.splitlines(), line
    assert "--gpus-per-task" not in text
    assert (f"exec {sys.executable} -m batchgen run {job_file} --task-index ${{SLURM_ARRAY_TASK_ID}} --num-tasks 3 "
            "--set sampling.max_tokens=3") in text
    assert (tmp_path / "out" / "_batchgen" / "logs").is_dir() and os.access(script, os.X_OK)
    assert json.loads((tmp_path / "out" / "_batchgen" / "slurm.json").read_text())["script"] == str(script)

    gpu = runner.invoke(cli, ["slurm", str(job_file), "--tasks", "2", "--gpus-per-task", "4",
                              "--script", str(tmp_path / "gpu.sbatch")])
    text = (tmp_path / "gpu.sbatch").read_text()
    assert gpu.exit_code == 0 and "#SBATCH --gpus-per-task=4" in text and "--data-parallel auto" in text


def test_status_after_slurm_names_the_sbatch_line_to_rerun(job_file, tokenizer, tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["slurm", str(job_file), "--tasks", "3", "--gpus-per-task", "0"]).exit_code == 0
    run_job(str(job_file), task_index=1, num_tasks=3, engine=EchoEngine(tokenizer), quiet=True)
    text = runner.invoke(cli, ["status", str(tmp_path / "out")]).output
    assert f"sbatch --array=0,2 {tmp_path}/out/_batchgen/job.sbatch" in text
    # A different task count is refused before any script is written.
    refused = runner.invoke(cli, ["slurm", str(job_file), "--tasks", "2", "--gpus-per-task", "0"])
    assert refused.exit_code == 1 and "array of 3 tasks" in refused.output


def test_slurm_submit_needs_sbatch(job_file, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = CliRunner().invoke(cli, ["slurm", str(job_file), "--tasks", "2", "--submit"])
    assert result.exit_code == 1 and "sbatch is not on PATH" in result.output


def test_bench_help():
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0 and "--quick" in result.output and "--dtype" in result.output


def test_run_help_lists_the_task_options():
    text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--task-index" in text and "--num-tasks" in text and "--data-parallel" in text


def test_job_file_sharding_is_validated(tmp_path):
    bad = write_job(tmp_path / "bad.yaml", input={"path": "x.jsonl"}, output={"path": "out"},
                    sharding={"num_tasks": 2, "task_index": 2})
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 2 and "sharding.task_index: 2 is not allowed; expected an integer in [0, 2)" in result.output
    bad = write_job(tmp_path / "bad2.yaml", input={"path": "x.jsonl"}, output={"path": "out"},
                    sharding={"data_parallel": "many"})
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 2 and "sharding.data_parallel: 'many' is not allowed" in result.output
    bad_cli = CliRunner().invoke(cli, ["run", str(bad), "--data-parallel", "0"])
    assert bad_cli.exit_code == 2 and "auto or an integer >= 1" in bad_cli.output


def test_the_output_of_an_array_is_read_through_task_directories(job_file, tokenizer, tmp_path):
    for i in range(2):
        run_job(str(job_file), task_index=i, num_tasks=2, engine=EchoEngine(tokenizer), quiet=True)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(Path(tmp_path) / "out" / "task-*" / "*.parquet"),
                               split="train")
    assert ds.num_rows == 13


def test_the_example_sbatch_script_is_valid_bash_and_an_array_that_resumes():
    import subprocess

    path = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "array.sbatch"
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    text = path.read_text()
    for line in ("#SBATCH --array=0-3", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120"):
        assert line in text.splitlines()
    assert 'exec "$PYTHON" -m batchgen run "$JOB" --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks "$NUM_TASKS"' in text
