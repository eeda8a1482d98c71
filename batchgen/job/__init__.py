"""The job layer: job.yaml in, committed Parquet parts out (see runner.run_job)."""

from batchgen.job.runner import JobConflict, JobFailed, JobResult, run_job
from batchgen.job.spec import JobSpec, JobSpecError, load_spec

__all__ = ["JobConflict", "JobFailed", "JobResult", "JobSpec", "JobSpecError", "load_spec", "run_job"]
