"""The `batchgen` command: run, validate, status, merge.

Exit codes: 0 done; 1 the job failed (on_error: fail, output of another job, a crash); 2 the job
file or command line is wrong; 128 + signal when stopped by one (143 SIGTERM, 130 SIGINT).
"""

from __future__ import annotations

import json
import logging
import sys

import click

from batchgen.job.outputs import (
    OutputError,
    format_status,
    merge_outputs,
    output_status,
)
from batchgen.job.progress import format_summary
from batchgen.job.runner import JobConflict, JobFailed, run_job
from batchgen.job.spec import JobSpec, JobSpecError, load_spec


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


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@_set_option
@click.option("--force", is_flag=True, help="Start over if the output directory holds a different job's output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no summary.")
def run(job: str, overrides: tuple[str, ...], force: bool, quiet: bool) -> None:
    """Run JOB (a job.yaml), resuming where a previous run of it stopped."""
    spec = _load(job, overrides)
    _logging(quiet)
    try:
        result = run_job(spec, force=force, quiet=quiet)
    except JobSpecError as e:  # input paths that match nothing are found only now
        raise _JobFileError(f"{job}: {e}") from None
    except (JobConflict, JobFailed) as e:
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
    if not report.ok:
        raise click.ClickException(f"{report.bad_rows} bad row(s) and on_error is fail: a run would stop")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: str, as_json: bool) -> None:
    """Rows done/total and errors of an OUTPUT directory."""
    try:
        st = output_status(output)
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.command()
@click.argument("outputs", nargs=-1, required=True)
@click.option("--to", "to", required=True, help="The Parquet file to write (local path or fsspec URL).")
def merge(outputs: tuple[str, ...], to: str) -> None:
    """Merge the committed rows of OUTPUTS (one job) into one Parquet file, in input order."""
    try:
        totals = merge_outputs(list(outputs), to)
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    total = "?" if totals["rows_total"] is None else totals["rows_total"]
    click.echo(f"wrote {totals['rows']} rows ({totals['errors']} errors) to {to}", err=True)
    if not totals["complete"]:
        click.echo(f"warning: the output is incomplete: {totals['rows_done']}/{total} rows done", err=True)


if __name__ == "__main__":
    main()
