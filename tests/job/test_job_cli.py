"""End to end: the `batchgen` CLI in a subprocess on the embedded model, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from batchgen.job.manifest import OutputDir
from tests.job.conftest import (
    DETERMINISTIC_ENGINE,
    REPO,
    SMALL_ENGINE,
    chat,
    run_cli,
    write_job,
    write_jsonl,
)

COMPARED = ("id", "generated_text", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "error")


def make_job(tmp_path: Path, input_path: str, *, engine=None, name="job.yaml", **sections) -> Path:
    spec = {"model": {"path": "smollm2-135m", "dtype": "float32"},
            "input": {"path": input_path},
            "output": {"path": "out", "commit_every_rows": 2},
            "sampling": {"max_tokens": 8, "temperature": 0.0},
            "engine": engine or SMALL_ENGINE}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return write_job(tmp_path / name, **spec)


def visible_rows(out: Path) -> list[dict]:
    """What any reader of OUT sees (pyarrow.dataset over the directory), sorted by input position."""
    if not list(out.glob("*.parquet")):
        return []
    table = pads.dataset(str(out)).to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["_shard_index"], r["_row_index"]))


@pytest.mark.slow
def test_jsonl_run_with_bad_lines_then_status_merge_validate(tmp_path):
    write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"id": "q1", "messages": chat("What is 2 + 2?"), "source": "math"},
        {"id": "q2", "prompt": "The capital of Italy is"},
        b'{"id": "q3", "prompt": "unterminated',
        b"\xff\xfe not utf-8",
        {"id": "q5", "prompt": None},
        {"id": "q6", "prompt": "word " * 300},  # longer than max_model_len (256)
        {"id": "q7", "messages": chat("Say hello."), "max_tokens": 3, "source": "greeting"},
    ])
    job = make_job(tmp_path, "data/*.jsonl")
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    assert "complete: 7/7 rows" in result.stderr and "4 errors" in result.stderr

    rows = visible_rows(tmp_path / "out")
    assert [r["_row_index"] for r in rows] == list(range(7))  # every input line exactly once
    by_id = {r["id"]: r for r in rows}
    assert by_id["q1"]["generated_text"] and by_id["q1"]["source"] == "math" and by_id["q1"]["error"] is None
    assert by_id["q7"]["num_generated_tokens"] <= 3
    assert by_id["data/rows.jsonl:2"]["error"].startswith("line 3: malformed JSON")
    assert by_id["data/rows.jsonl:3"]["error"].startswith("line 4: not valid UTF-8")
    assert "neither 'messages' nor 'prompt'" in by_id["q5"]["error"]
    assert "max_model_len is 256" in by_id["q6"]["error"]

    stats = json.loads((tmp_path / "out" / "_batchgen" / "stats.json").read_text())
    assert stats["job"]["rows_done"] == 7 and stats["job"]["errors"] == 4 and stats["interrupted"] is None
    assert stats["run"]["generated_tokens"] > 0 and "prefix_cache_hit_rate" in stats["run"]

    status = run_cli("status", str(tmp_path / "out"))
    assert status.returncode == 0 and "complete, 7/7 rows (4 errors, 0 skipped)" in status.stdout
    merged = tmp_path / "merged.parquet"
    assert run_cli("merge", str(tmp_path / "out"), "--to", str(merged)).returncode == 0
    table = pq.read_table(merged)
    assert table["id"].to_pylist()[:2] == ["q1", "q2"] and table.num_rows == 7
    assert "_row_index" not in table.column_names

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")
    assert ds.num_rows == 7

    check = run_cli("validate", str(job))
    assert check.returncode == 0, check.stderr
    assert "7 rows, 4 bad" in check.stdout and "bad row q5" in check.stdout
    # SmolLM2-135M: 2 * 30 layers * 3 KV heads * 64 dims * 4 bytes (float32) = 45 KiB per token
    assert "45.0 KiB/token" in check.stdout
    assert "7 rows committed; run resumes from there" in check.stdout


@pytest.mark.slow
def test_parquet_input_with_kept_columns_and_sampling_columns(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"uid": ["a", "b", "c"], "prompt": ["Once upon a time", "The sea is", "Dogs are"],
                             "max_tokens": pa.array([2, None, 4], pa.int64()), "lang": ["en", "en", "fr"],
                             "unused": [1, 2, 3]}), tmp_path / "data" / "part-0.parquet")
    job = make_job(tmp_path, "data/part-0.parquet", input={"path": "data/part-0.parquet", "id_column": "uid"},
                   output={"path": "out", "keep_columns": ["lang"]})
    result = run_cli("run", "--quiet", str(job))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # --quiet: no progress, no summary
    rows = visible_rows(tmp_path / "out")
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {*COMPARED, "lang", "num_cached_tokens", "_shard_index", "_row_index"}
    assert rows[0]["num_generated_tokens"] <= 2 and rows[2]["num_generated_tokens"] <= 4
    assert rows[1]["num_generated_tokens"] == 8 or rows[1]["finish_reason"] == "stop"


@pytest.mark.slow
def test_openai_batch_input(tmp_path):
    write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": "task-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": chat("Name a fruit."), "max_tokens": 4}},
        {"custom_id": "task-2", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Roses are red,", "max_tokens": 5, "temperature": 0}},
        {"custom_id": "task-3", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": chat("x"), "functions": [{"name": "f"}]}},
    ])
    job = make_job(tmp_path, "batch.jsonl")
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in visible_rows(tmp_path / "out")}
    assert set(by_id) == {"task-1", "task-2", "task-3"}
    assert by_id["task-1"]["num_generated_tokens"] <= 4 and by_id["task-2"]["num_generated_tokens"] <= 5
    assert by_id["task-3"]["error"] == "line 3: body.functions is not supported"


KILL_ROWS = [{"id": f"r{i:02d}", "messages": chat(f"Give me fact number {i} about the ocean.")} for i in range(10)]
KILL_ROWS[3] = b'{"id": "r03", "messages": [oops'
KILL_ROWS[7] = {"id": "r07", "messages": []}


@pytest.mark.slow
def test_kill_9_at_any_point_then_resume_gives_every_row_once_and_same_results(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", KILL_ROWS)
    clean_job = make_job(tmp_path / "clean", str(tmp_path / "rows.jsonl"), engine=DETERMINISTIC_ENGINE,
                         sampling={"max_tokens": 6})
    assert run_cli("run", "-q", str(clean_job)).returncode == 0
    # Keyed by input position: generated ids of bad lines name the shard relative to each job file.
    reference = {r["_row_index"]: [r[c] for c in COMPARED[1:]] for r in visible_rows(tmp_path / "clean" / "out")}
    assert len(reference) == 10

    job = make_job(tmp_path, str(tmp_path / "rows.jsonl"), engine=DETERMINISTIC_ENGINE, sampling={"max_tokens": 6})
    out = tmp_path / "out"

    def check_exactly_once_so_far() -> int:
        rows = visible_rows(out)
        keys = [(r["_shard_index"], r["_row_index"]) for r in rows]
        assert len(keys) == len(set(keys)), "a row was written twice"
        for r in rows:
            assert [r[c] for c in COMPARED[1:]] == reference[r["_row_index"]]
        return len(rows)

    # 1. A real kill -9 from outside, as soon as the first part is committed.
    proc = subprocess.Popen([sys.executable, "-m", "batchgen", "run", "-q", str(job)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "_batchgen" / "commits").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    done = check_exactly_once_so_far()
    # The kill may land between a part's commit record and its move into OUT: then no row is visible
    # yet, and the resume below rolls that part forward.
    assert done < 10

    # 2. SIGKILL with a part written but not committed (an orphan), right after a commit point (the
    #    part is still pending: rolled forward), and in the middle of generating; resuming each time.
    #    test_job_output.py covers every commit step without the model.
    for point in ("part_written=2", "record_written=1", "engine_step=5"):
        crashed = run_cli("run", "-q", str(job), env={"BATCHGEN_FAILPOINTS": point})
        assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr)
        check_exactly_once_so_far()

    final = run_cli("run", str(job))
    assert final.returncode == 0, final.stderr
    assert check_exactly_once_so_far() == 10
    assert {r["_row_index"]: [r[c] for c in COMPARED[1:]] for r in visible_rows(out)} == reference
    assert not list((out / "_batchgen" / "pending").glob("*"))


@pytest.mark.slow
def test_sigterm_commits_finished_rows_and_exits_143(tmp_path):
    sig = signal.SIGTERM
    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"List {i} animals:"} for i in range(12)])
    # One row at a time, so the run is still busy when the signal comes after the first commit.
    job = make_job(tmp_path, "rows.jsonl", engine=DETERMINISTIC_ENGINE, sampling={"max_tokens": 6})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "batchgen", "run", str(job)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "_batchgen" / "commits").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr

    stats = json.loads((out / "_batchgen" / "stats.json").read_text())
    assert stats["interrupted"] == "SIGTERM" and not stats["job"]["complete"]
    committed = visible_rows(out)
    assert 2 <= len(committed) < 12 and stats["job"]["rows_done"] == len(committed)
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in committed)
    assert not list((out / "_batchgen" / "pending").glob("*"))  # nothing half-written left behind

    # The job resumes to completion without writing anything twice.
    assert run_cli("run", "-q", str(job)).returncode == 0
    assert [r["_row_index"] for r in visible_rows(out)] == list(range(12))


@pytest.mark.parametrize("first, second, code", [(signal.SIGTERM, signal.SIGINT, 130),
                                                 (signal.SIGINT, signal.SIGTERM, 143)])
def test_the_first_signal_asks_to_stop_and_a_second_exits_at_once(first, second, code):
    child = ("import os, signal\n"
             "from batchgen.job.signals import StopSignals\n"
             "with StopSignals() as s:\n"
             f"    os.kill(os.getpid(), {int(first)})\n"
             "    print('stopping', s.received, s.exit_code, flush=True)\n"
             f"    os.kill(os.getpid(), {int(second)})\n"
             "    print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout == f"stopping {int(first)} {128 + int(first)}\n" and proc.returncode == code


@pytest.mark.slow
def test_a_changed_job_is_refused_on_resume_and_force_starts_over(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "Hello"}])
    job = make_job(tmp_path, "rows.jsonl")
    assert run_cli("run", "-q", str(job)).returncode == 0
    refused = run_cli("run", "-q", str(job), "--set", "sampling.max_tokens=3")
    assert refused.returncode == 1
    assert "holds the output of a different job" in refused.stderr and "sampling.max_tokens: 8 -> 3" in refused.stderr
    forced = run_cli("run", "-q", str(job), "--set", "sampling.max_tokens=3", "--force")
    assert forced.returncode == 0, forced.stderr
    assert visible_rows(tmp_path / "out")[0]["num_generated_tokens"] <= 3
    assert len(OutputDir(str(tmp_path / "out")).records()) == 1


def test_job_file_errors_exit_2_with_the_field_path(tmp_path):
    job = write_job(tmp_path / "job.yaml", input={"path": "x.jsonl", "format": "xml"}, output={"path": "out"})
    result = run_cli("run", str(job))
    assert result.returncode == 2
    assert ("input.format: 'xml' is not allowed; expected one of auto, parquet, jsonl, openai-batch, hf-dataset"
            in result.stderr)
    missing = write_job(tmp_path / "missing.yaml", input={"path": "nothing/*.jsonl"}, output={"path": "out"})
    result = run_cli("validate", str(missing))
    assert result.returncode == 2 and "input.path: " in result.stderr and "matched no files" in result.stderr
    assert not os.path.exists(tmp_path / "out")  # refused before any work
