"""Progress on stderr while a job runs, and the summary it ends with."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

_REFRESH_S = 0.5


class Progress:
    """rows done/total, output tok/s and the prefix-cache hit rate; silent when quiet."""

    def __init__(self, total: int | None, done: int, quiet: bool, engine_stats: Callable[[], dict[str, Any]]):
        self.bar = tqdm(total=total, initial=done, unit="row", disable=quiet, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.05)
        self.engine_stats = engine_stats
        self._start = time.perf_counter()
        self._tokens_before = engine_stats().get("generated_tokens", 0)  # an engine may be reused across jobs
        self._last_refresh = 0.0

    def advance(self, rows: int) -> None:
        if self.bar.disable:
            return
        if rows:
            self.bar.update(rows)
        now = time.perf_counter()
        if now - self._last_refresh >= _REFRESH_S:
            self._last_refresh = now
            s = self.engine_stats()
            tokens = s.get("generated_tokens", 0) - self._tokens_before
            self.bar.set_postfix_str(postfix(tokens / max(now - self._start, 1e-9), s), refresh=False)

    def close(self) -> None:
        self.bar.close()


def postfix(tokens_per_s: float, stats: dict[str, Any]) -> str:
    """"123 tok/s, prefix hit 45%[, spec accept 67%]" from engine statistics."""
    text = f"{tokens_per_s:.0f} tok/s, prefix hit {stats.get('prefix_cache_hit_rate', 0.0):.0%}"
    if stats.get("spec_acceptance_rate") is not None:
        text += f", spec accept {stats['spec_acceptance_rate']:.0%}"
    if "reasoning_tokens" in stats:  # output.reasoning: finished rows' reasoning and answer tokens
        text += f", reasoning {stats['reasoning_tokens']} / answer {stats['answer_tokens']} tok"
    return text


def format_summary(stats: dict[str, Any]) -> str:
    run, job = stats["run"], stats["job"]
    total = "?" if job["rows_total"] is None else job["rows_total"]
    if stats["interrupted"]:
        state = f"stopped by {stats['interrupted']}"
    else:
        state = "complete" if job["complete"] else "incomplete"
    return (f"batchgen: {state}: {job['rows_done']}/{total} rows in {stats['output']} "
            f"({job['errors']} errors, {job['skipped']} skipped)\n"
            f"  this run: {run['rows']} rows ({run['errors']} errors, {run['skipped']} skipped) in "
            f"{run['wall_time_s']:.1f}s ({run['generation_time_s']:.1f}s generating); "
            f"{run['generated_tokens']} tokens generated, {run['output_tokens_per_s']:.1f} tok/s; "
            f"prefix-cache hit rate {run['prefix_cache_hit_rate']:.1%}"
            + (f"; speculative acceptance {run['spec_acceptance_rate']:.1%} "
               f"({run.get('spec_mean_accepted_length', 0.0):.2f} tokens per verify step)"
               if run.get("spec_acceptance_rate") is not None else "")
            + (f"; {run['reasoning_tokens']} reasoning and {run['answer_tokens']} answer tokens"
               if "reasoning_tokens" in run else "")
            + (f"; {run['data_parallel']} engine processes" if run.get("data_parallel", 1) > 1 else ""))
