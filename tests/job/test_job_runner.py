"""run_job in-process with the real engine: memory:// in and out, error policies, refusal, n > 1."""

from __future__ import annotations

import json
import uuid

import fsspec
import pyarrow.parquet as pq
import pytest

from batchgen.job.manifest import OutputDir
from batchgen.job.outputs import read_output
from batchgen.job.runner import JobConflict, JobFailed, run_job
from tests.job.conftest import SMALL_ENGINE, chat

pytestmark = pytest.mark.slow  # the embedded model

ROWS = [
    {"id": "good-0", "messages": chat("What is the capital of France?"), "topic": "geo"},
    b'{"id": "broken", "messages": [',
    {"id": "good-1", "prompt": "The three primary colors are", "max_tokens": 2},
    {"id": "empty", "prompt": ""},
    {"id": "good-2", "messages": chat("Name a color."), "topic": "art"},
    {"id": "bad-temp", "prompt": "x", "temperature": -3},
]


@pytest.fixture
def memory_dir():
    root = f"memory://runner-{uuid.uuid4().hex[:8]}"
    yield root
    fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def put_jsonl(url: str, rows: list) -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    fsspec.filesystem("memory").pipe(url.removeprefix("memory://"), b"\n".join(lines) + b"\n")


def job(root: str, **changes) -> dict:
    spec = {"model": {"path": "smollm2-135m", "dtype": "float32"},
            "input": {"path": f"{root}/in/*.jsonl"},
            "output": {"path": f"{root}/out", "commit_every_rows": 2},
            "sampling": {"max_tokens": 6, "temperature": 0.0},
            "engine": dict(SMALL_ENGINE)}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        spec.setdefault(section, {})
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    return spec


def rows_by_id(url: str) -> dict[str, dict]:
    table, _ = read_output([url])
    return {r["id"]: r for r in table.to_pylist()}


def test_memory_input_and_output_every_row_once(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS)
    result = run_job(job(memory_dir), engine=engine, quiet=True)
    assert result.exit_code == 0 and result.complete

    rows = rows_by_id(f"{memory_dir}/out")
    assert len(rows) == len(ROWS)
    broken_id = f"{memory_dir}/in/a.jsonl:1".replace("memory://", "memory:///")
    assert set(rows) == {"good-0", broken_id, "good-1", "empty", "good-2", "bad-temp"}
    for name in ("good-0", "good-1", "good-2"):
        r = rows[name]
        assert r["error"] is None and r["generated_text"] and r["finish_reason"] in ("stop", "length")
        assert 0 < r["num_generated_tokens"] <= 6 and r["num_prompt_tokens"] > 0
    assert rows["good-1"]["num_generated_tokens"] <= 2  # the row's own max_tokens
    assert rows["good-0"]["topic"] == "geo" and rows["good-1"]["topic"] is None  # kept input columns
    assert rows[broken_id]["error"].startswith("line 2: malformed JSON")
    assert rows["empty"]["error"] == "'prompt' is empty" and rows["empty"]["finish_reason"] == "error"
    assert "temperature=-3" in rows["bad-temp"]["error"]

    stats = result.stats
    assert stats["job"]["rows_done"] == stats["job"]["rows_total"] == 6 and stats["job"]["errors"] == 3
    assert stats["run"]["generated_tokens"] == sum(r["num_generated_tokens"] for r in rows.values())
    assert OutputDir(f"{memory_dir}/out").read_stats()["job"] == stats["job"]

    commits = len(OutputDir(f"{memory_dir}/out").records())
    again = run_job(job(memory_dir), engine=engine, quiet=True)  # nothing left: nothing written twice
    assert again.stats["run"]["rows"] == 0 and len(OutputDir(f"{memory_dir}/out").records()) == commits
    assert len(rows_by_id(f"{memory_dir}/out")) == 6


def test_on_error_skip_records_the_rows_as_done_without_output(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS)
    result = run_job(job(memory_dir, on_error="skip"), engine=engine, quiet=True)
    assert result.complete and result.stats["job"]["skipped"] == 3
    assert set(rows_by_id(f"{memory_dir}/out")) == {"good-0", "good-1", "good-2"}
    assert run_job(job(memory_dir, on_error="skip"), engine=engine, quiet=True).stats["run"]["skipped"] == 0


def test_on_error_fail_stops_before_the_bad_rows_window(engine, memory_dir):
    rows = [{"id": f"ok-{i}", "prompt": f"Count to {i}:"} for i in range(4)] + [{"id": "no-prompt"}]
    put_jsonl(f"{memory_dir}/in/a.jsonl", rows)
    with pytest.raises(JobFailed, match=r"row 'no-prompt' .*no prompt"):
        run_job(job(memory_dir, on_error="fail", input__group_window=4), engine=engine, quiet=True)
    # The first window (4 good rows) was generated and committed; nothing of the failing window.
    assert set(rows_by_id(f"{memory_dir}/out")) == {"ok-0", "ok-1", "ok-2", "ok-3"}


def test_a_changed_job_is_refused_and_force_starts_over(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS[:1])
    run_job(job(memory_dir), engine=engine, quiet=True)
    # Throughput knobs are not part of the job: a requeue onto a bigger machine may change them.
    tuned = run_job(job(memory_dir, engine=dict(SMALL_ENGINE, max_num_seqs=64, num_kv_blocks=1024)),
                    engine=engine, quiet=True)
    assert tuned.complete and tuned.stats["run"]["rows"] == 0
    with pytest.raises(JobConflict, match=r"sampling.max_tokens: 6 -> 3"):
        run_job(job(memory_dir, sampling__max_tokens=3), engine=engine, quiet=True)
    result = run_job(job(memory_dir, sampling__max_tokens=3), engine=engine, quiet=True, force=True)
    assert result.complete
    assert rows_by_id(f"{memory_dir}/out")["good-0"]["num_generated_tokens"] <= 3
    assert len(OutputDir(f"{memory_dir}/out").records()) == 1  # the old job's commits are gone


def test_a_changed_input_file_is_another_job(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS[:1])
    run_job(job(memory_dir), engine=engine, quiet=True)
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS[:1] + ROWS[2:3])  # appended: row keys would no longer match
    with pytest.raises(JobConflict, match="input.shards"):
        run_job(job(memory_dir), engine=engine, quiet=True)


def test_output_next_to_foreign_files_is_refused(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS[:1])
    fsspec.filesystem("memory").pipe(f"{memory_dir}/out/data.csv".removeprefix("memory://"), b"a,b\n")
    with pytest.raises(JobConflict, match="did not write"):
        run_job(job(memory_dir), engine=engine, quiet=True)


def test_n_samples_and_logprobs(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", [{"id": "a", "prompt": "Once upon a time", "n": 3},
                                           {"id": "b", "prompt": "The sky is"}])
    spec = job(memory_dir, sampling={"max_tokens": 4, "temperature": 0.8, "seed": 1, "n": 2, "logprobs": 2})
    run_job(spec, engine=engine, quiet=True)
    rows = rows_by_id(f"{memory_dir}/out")
    assert len(rows["a"]["generated_text"]) == 3 and len(rows["b"]["generated_text"]) == 2
    assert rows["b"]["num_generated_tokens"] == sum(len(x) for x in rows["b"]["logprobs"])
    entry = rows["b"]["logprobs"][0][0]
    assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
    assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


def test_rows_sharing_a_prefix_hit_the_prefix_cache(engine, memory_dir):
    preamble = "You are a meticulous assistant who answers questions about geography. " * 6
    questions = [f"Question {i}: name a river in country number {i}." for i in range(12)]
    put_jsonl(f"{memory_dir}/in/a.jsonl", [{"id": str(i), "prompt": preamble + q} for i, q in enumerate(questions)])
    result = run_job(job(memory_dir, sampling__max_tokens=2), engine=engine, quiet=True)
    table, _ = read_output([f"{memory_dir}/out"])
    cached = table["num_cached_tokens"].to_pylist()
    # 12 rows, at most max_num_seqs (8) computed at once: the later ones reuse the shared preamble.
    assert sum(c >= 64 for c in cached) >= 4, cached
    assert result.stats["run"]["cached_tokens"] == sum(cached)


def test_parts_are_plain_parquet_with_one_schema(engine, memory_dir):
    put_jsonl(f"{memory_dir}/in/a.jsonl", ROWS)
    run_job(job(memory_dir), engine=engine, quiet=True)
    out = OutputDir(f"{memory_dir}/out")
    schemas, error_only_parts = set(), 0
    for record in out.records():
        with out.fs.open(out.path(record["part"]), "rb") as f:
            schemas.add(pq.read_schema(f).to_string())
        error_only_parts += record["num_errors"] == record["num_rows"]
    # A part of error rows alone (generated_text all null) has the same schema as the others.
    assert len(out.records()) >= 2 and error_only_parts >= 1 and len(schemas) == 1
