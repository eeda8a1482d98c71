"""Where tensor-parallel engines go: data parallelism over groups of tensor_parallel_size GPUs."""

from __future__ import annotations


def group_gpus(resolve, value, gpus: list[str], tp: int) -> tuple[int, list[str] | None]:
    """(engines, each one's CUDA_VISIBLE_DEVICES, e.g. "0,1") for --data-parallel auto|N with tp GPUs per engine.
    `resolve` is the job layer's resolve_data_parallel, asked about engines instead of GPUs."""
    from batchgen.job.spec import JobSpecError, parse_data_parallel

    try:
        value = parse_data_parallel(value)
    except ValueError as e:
        raise JobSpecError(f"data_parallel: {e}") from None
    if gpus and len(gpus) < tp:
        raise JobSpecError(f"engine.tensor_parallel_size={tp}, but only {len(gpus)} GPU(s) are visible "
                           f"({', '.join(gpus)})")
    groups = [",".join(gpus[i * tp:(i + 1) * tp]) for i in range(len(gpus) // tp)]
    if not gpus:  # CPU: ranks are processes
        return resolve(value, "cpu")
    if value in (None, 1) or (value == "auto" and len(groups) == 1):
        return 1, None  # one engine: its ranks take the visible GPUs in order
    n = len(groups) if value == "auto" else int(value)
    if n > len(groups):
        raise JobSpecError(f"data_parallel: {n} engines of tensor_parallel_size={tp} need {n * tp} GPUs, "
                           f"{len(gpus)} are visible ({', '.join(gpus)})")
    return n, groups[:n]
