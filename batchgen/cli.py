"""The `batchgen` command: run, validate, status, merge, slurm, bench.

Exit codes: 0 done; 1 the job failed (on_error: fail, output of another job or in use by another
run, a data-parallel worker that died past its restarts, a crash); 2 the job file or command line
is wrong; 128 + signal when stopped by one (143 SIGTERM, 130 SIGINT).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from batchgen.job.lease import OutputBusy
from batchgen.job.outputs import (
    OutputError,
    format_status,
    merge_outputs,
    output_status,
)
from batchgen.job.parallel import WorkerFailed
from batchgen.job.progress import format_summary
from batchgen.job.runner import JobConflict, JobFailed, run_job
from batchgen.job.spec import JobSpec, JobSpecError, load_spec, parse_data_parallel


class _JobFileError(click.ClickException):
    exit_code = 2


def _load(job: str, overrides: tuple[str, ...]) -> JobSpec:
    try:
        return load_spec(job, overrides)
    except JobSpecError as e:
        raise _JobFileError(f"{job}: {e}") from None


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(name)s: %(message)s")


_set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
                           help="Override a job file field, e.g. --set sampling.max_tokens=64 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Offline batch LLM generation over Parquet/JSONL datasets, resumable exactly-once."""


def _data_parallel(ctx, param, value):
    try:
        return parse_data_parallel(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


_data_parallel_option = click.option(
    "--data-parallel", callback=_data_parallel, metavar="auto|N",
    help="Engine processes over disjoint parts of the rows: auto = one per visible GPU (1 on CPU).")


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_set_option
@click.option("--force", is_flag=True, help="Start over if the output directory holds a different job's output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary.")
@click.option("--task-index", type=click.IntRange(min=0), help="This run's task of an array job (0-based).")
@click.option("--num-tasks", type=click.IntRange(min=1),
              help="Tasks the rows are split over (default: sharding.num_tasks, SLURM_ARRAY_TASK_COUNT in a "
                   "Slurm array, else 1).")
@_data_parallel_option
def run(job: str, overrides: tuple[str, ...], force: bool, quiet: bool, task_index: int | None,
        num_tasks: int | None, data_parallel: int | str | None) -> None:
    """Run JOB (a job.yaml), resuming where a previous run of it stopped.

    Inside a Slurm array (or with --task-index/--num-tasks) it runs one task: a deterministic share
    of the rows, written to OUT/task-<i>/.
    """
    spec = _load(job, overrides)
    _logging(quiet)
    from batchgen.distributed.group import is_external_worker

    if is_external_worker(spec.engine.get("tensor_parallel_size", 1)):  # torchrun / srun rank > 0: no job
        from batchgen.engine import Engine  # layer here; the engine serves rank 0's steps, then exits

        Engine(spec.engine_config())
    try:
        result = run_job(spec, force=force, quiet=quiet, task_index=task_index, num_tasks=num_tasks,
                         data_parallel=data_parallel)
    except JobSpecError as e:  # input paths that match nothing are found only now
        raise _JobFileError(f"{job}: {e}") from None
    except (JobConflict, OutputBusy, JobFailed, WorkerFailed) as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        click.echo(format_summary(result.stats), err=True)
    sys.exit(result.exit_code)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_set_option
def validate(job: str, overrides: tuple[str, ...]) -> None:
    """Check JOB and read its whole input without loading model weights."""
    from batchgen.job.validate import validate_job

    spec = _load(job, overrides)
    _logging(quiet=True)
    try:
        report = validate_job(spec)
    except JobSpecError as e:
        raise _JobFileError(f"{job}: {e}") from None
    click.echo(report.format())
    if report.missing_adapters:
        raise click.ClickException(f"LoRA adapter(s) {', '.join(report.missing_adapters)} not found: a run would fail")
    if not report.ok:
        raise click.ClickException(f"{report.bad_rows} bad row(s) and on_error is fail: a run would stop")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, as_json: bool) -> None:
    """Rows done/total and errors of an OUTPUT directory (per task for an array job)."""
    try:
        st = output_status(output)
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.command()
@click.argument("outputs", nargs=-1, required=True)
@click.option("--to", "to", required=True,
              help="The file to write: Parquet, or JSON Lines for a .jsonl name (local path or fsspec URL); "
                   "written whole or not at all.")
@click.option("--allow-partial", is_flag=True, help="Merge what is committed even while tasks have not finished.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "openai-batch"]), default="parquet", show_default=True,
              help="openai-batch: JSONL in OpenAI's batch output shape, one line per input row.")
@click.option("--errors-to", help="With --format openai-batch: write the error lines to this file instead.")
def merge(outputs: tuple[str, ...], to: str, allow_partial: bool, fmt: str, errors_to: str | None) -> None:
    """Merge the committed rows of OUTPUTS (one job) into one file, in input order, streaming.

    An array job's OUT is merged over all its tasks; while a task has not finished, merge refuses
    and names it (--allow-partial merges what is there and warns).
    """
    if errors_to and fmt != "openai-batch":
        raise click.UsageError("--errors-to goes with --format openai-batch")
    try:
        if fmt == "openai-batch":
            from batchgen.job.openai_output import merge_openai_batch

            totals = merge_openai_batch(list(outputs), to, errors_to, allow_partial=allow_partial)
        else:
            totals = merge_outputs(list(outputs), to, allow_partial=allow_partial)
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    total = "?" if totals["rows_total"] is None else totals["rows_total"]
    click.echo(f"wrote {totals['rows']} rows ({totals['errors']} errors) to {to}", err=True)
    if not totals["complete"]:
        missing = f"; not finished: {'; '.join(totals['unfinished'])}" if totals["unfinished"] else ""
        click.echo(f"warning: the output is incomplete ({totals['rows_done']}/{total} rows){missing}", err=True)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--tasks", "-n", type=click.IntRange(min=1), required=True, help="Array tasks to split the rows over.")
@click.option("--gpus-per-task", type=click.IntRange(min=0), default=1, show_default=True,
              help="GPUs per task (0 on CPU clusters); with more than one, --data-parallel auto is the default.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), help="sbatch --cpus-per-task.")
@click.option("--mem", help="sbatch --mem, e.g. 32G.")
@click.option("--time", "time_limit", help="sbatch --time, e.g. 4:00:00.")
@click.option("--partition", help="sbatch --partition.")
@click.option("--account", help="sbatch --account.")
@click.option("--grace", type=click.IntRange(min=1), default=120, show_default=True,
              help="Seconds before the time limit at which tasks get SIGTERM to commit (--signal=B:TERM@GRACE).")
@_data_parallel_option
@click.option("--job-name", help="sbatch --job-name (default: batchgen-<job file name>).")
@click.option("--script", type=click.Path(dir_okay=False),
              help="Where to write the sbatch script (default: OUT/_batchgen/<job>.sbatch, or ./<job>.sbatch "
                   "for a remote output).")
@click.option("--log-dir", type=click.Path(file_okay=False),
              help="Task logs, one per task, appended across requeues (default: OUT/_batchgen/logs).")
@click.option("--sbatch", "extra", multiple=True, metavar="OPTION",
              help="Another #SBATCH line, e.g. --sbatch=--constraint=h100 (repeatable).")
@_set_option
@click.option("--submit", is_flag=True, help="Submit the script with sbatch after writing it.")
def slurm(job: str, tasks: int, gpus_per_task: int, cpus_per_task: int | None, mem: str | None,
          time_limit: str | None, partition: str | None, account: str | None, grace: int,
          data_parallel: int | str | None, job_name: str | None, script: str | None, log_dir: str | None,
          extra: tuple[str, ...], overrides: tuple[str, ...], submit: bool) -> None:
    """Write (and with --submit, submit) an sbatch script that runs JOB as a Slurm array of TASKS.

    Each task runs `batchgen run JOB --task-index $SLURM_ARRAY_TASK_ID --num-tasks TASKS` with this
    Python, takes its share of the rows and resumes exactly-once when requeued. Follow it with
    `batchgen status OUT` and assemble the result with `batchgen merge OUT --to FILE`.
    """
    from batchgen.job import slurm as slurm_mod
    from batchgen.job.outdir import JobOutput
    from batchgen.job.tasks import Task

    spec = _load(job, overrides)
    opts = slurm_mod.SlurmOptions(tasks, gpus_per_task, cpus_per_task, mem, time_limit, partition, account, grace,
                                  None if data_parallel is None else str(data_parallel), job_name, log_dir,
                                  overrides, list(extra))
    try:
        JobOutput(spec.output.path).check_task_count(Task(0, tasks), force=False)
        path, logs = slurm_mod.write_script(job, spec, opts, script)
    except (slurm_mod.SlurmError, JobConflict) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path} ({tasks} tasks; logs in {logs})", err=True)
    if not submit:
        click.echo(f"submit it with: sbatch {path}", err=True)
        return
    try:
        job_id = slurm_mod.submit(path)
    except slurm_mod.SlurmError as e:
        raise click.ClickException(str(e)) from None
    click.echo(job_id)
    click.echo(f"submitted array job {job_id}: follow it with `squeue -j {job_id}` and "
               f"`batchgen status {spec.output.path}`", err=True)


@main.command()
@click.option("--quick", is_flag=True, help="Small workloads and one peer batch size: a smoke run.")
@click.option("--out", "out", default="bench-results", show_default=True, type=click.Path(file_okay=False),
              help="Directory for results.json and results.md.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="auto: the engine's default (bf16 on GPUs and on CPUs with bf16 instructions, else fp32).")
def bench(quick: bool, out: str, dtype: str) -> None:
    """Benchmark batchgen against its peers (HF generate, static and continuous batching) on the embedded model."""
    try:
        from benchmarks.run import main as bench_main
    except ImportError as e:
        raise click.ClickException(f"the benchmarks package is not importable ({e}); run from the repository "
                                   "checkout (pip install -e .)") from None
    bench_main(quick=quick, out=out, dtype=dtype)


if __name__ == "__main__":
    main()
