"""Writing output: schema, atomic parts, the commit protocol under real SIGKILLs, status and merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from batchgen.job.columns import decode_json_columns
from batchgen.job.manifest import OutputDir, RowSet
from batchgen.job.outputs import OutputError, merge_outputs, output_status, read_output
from batchgen.job.planner import Planned
from batchgen.job.reader import Row
from batchgen.job.schema import OutputSchema, kept_storage
from batchgen.job.spec import JobSpec
from batchgen.job.writer import PartWriter
from batchgen.sampling import CompletionOutput, RequestOutput, SamplingParams

FINGERPRINT = {"model": {"path": "m"}, "job": 1}


def spec(**output) -> JobSpec:
    return JobSpec.from_dict({"input": {"path": "x.jsonl"}, "output": {"path": "out", **output}}, "/")


def done_row(i: int, shard: int = 0) -> tuple[Row, RequestOutput]:
    row = Row(shard, i, f"id-{shard}-{i}", {"topic": f"t{i}"}, prompt=f"p{i}")
    out = RequestOutput(row.request_id, None, [1, 2, 3], [CompletionOutput(0, f"text {i}", [5, 6], "length")],
                        num_cached_tokens=1)
    return row, out


def writer_for(url: str, every_rows: int = 1000) -> PartWriter:
    out = OutputDir(url)
    out.write_manifest({"fingerprint": FINGERPRINT, "total_rows": 10})
    schema = OutputSchema(pa.schema([("topic", pa.string())]), list_output=False, with_logprobs=False)
    return PartWriter(out, schema, every_rows, every_seconds=3600)


def write_rows(writer: PartWriter, indices, shard: int = 0) -> None:
    for i in indices:
        row, out = done_row(i, shard)
        writer.add(writer.schema.success(Planned(row, params=SamplingParams()), out))


def test_row_set_is_a_bitmap_per_shard():
    rows = RowSet()
    for key in [(0, 0), (0, 9), (3, 1_000_003), (0, 9)]:
        rows.add(*key)
    assert len(rows) == 3 and (0, 9) in rows and (3, 1_000_003) in rows
    assert (0, 8) not in rows and (1, 0) not in rows and (3, 1_000_004) not in rows


def test_commits_write_parts_and_records_that_resume_reads(tmp_path):
    writer = writer_for(str(tmp_path / "out"), every_rows=3)
    write_rows(writer, [4, 0, 2])
    assert writer.maybe_commit()
    write_rows(writer, [1])
    writer.skip(Row(0, 3, "id-0-3"))
    assert not writer.maybe_commit()  # under both thresholds
    writer.commit()

    out = OutputDir(str(tmp_path / "out"))
    records = out.records()
    assert [r["rows"] for r in records] == [{"0": [0, 2, 4]}, {"0": [1]}]
    assert records[1]["skipped"] == {"0": [3]} and records[1]["num_skipped"] == 1
    done = out.committed_rows()
    assert len(done) == 5 and all((0, i) in done for i in range(5))
    table = pads.dataset(str(tmp_path / "out")).to_table()
    assert sorted(table["_row_index"].to_pylist()) == [0, 1, 2, 4]
    first = pads.dataset(str(tmp_path / "out" / records[0]["part"])).to_table().to_pylist()
    assert [r["_row_index"] for r in first] == [0, 2, 4]  # sorted within a part
    assert first[0] == {"id": "id-0-0", "topic": "t0", "generated_text": "text 0", "finish_reason": "length",
                        "num_prompt_tokens": 3, "num_generated_tokens": 2, "num_cached_tokens": 1, "error": None,
                        "_shard_index": 0, "_row_index": 0}


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_job_output import writer_for, write_rows
    writer = writer_for({url!r})
    write_rows(writer, [0, 1]); writer.commit()
    write_rows(writer, [2, 3]); writer.commit()
    write_rows(writer, [4]); writer.commit()
""")


@pytest.mark.parametrize("failpoint, committed", [
    ("part_written=2", [0, 1]),  # killed with the 2nd part written but not committed: an orphan
    ("record_written=2", [0, 1, 2, 3]),  # killed after the 2nd commit point: the part is rolled forward
    ("part_moved=2", [0, 1, 2, 3]),
    ("part_written=1", []),
])
def test_sigkill_between_commit_steps_loses_nothing_committed(tmp_path, failpoint, committed):
    url = str(tmp_path / "out")
    code = CHILD.format(tests=os.path.dirname(__file__), url=url)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BATCHGEN_FAILPOINTS": failpoint},
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    # Before any repair, readers of OUT never see an uncommitted part (a committed one may still be
    # pending when the kill came right after its record).
    rolled_forward_later = failpoint.startswith("record_written")
    assert visible_rows(url) == ([0, 1] if rolled_forward_later else committed)

    out = OutputDir(url)
    out.recover()
    assert sorted(row for _, row in committed_keys(out)) == committed
    assert store_files(out.pending_dir) == []
    assert visible_rows(url) == committed

    # The resumed writer continues beside what survived; every row ends up exactly once.
    writer = writer_for(url)
    write_rows(writer, [i for i in range(5) if (0, i) not in out.committed_rows()])
    writer.commit()
    assert visible_rows(url) == [0, 1, 2, 3, 4]


def visible_rows(url: str) -> list[int]:
    """What a reader of OUT sees: the row indices of every visible Parquet file."""
    if not any(n.endswith(".parquet") and not n.startswith(("_", ".")) for n in os.listdir(url)):
        return []
    return sorted(pads.dataset(url).to_table()["_row_index"].to_pylist())


def committed_keys(out: OutputDir) -> list[tuple[int, int]]:
    return [(int(s), i) for r in out.records() for s, rows in r["rows"].items() for i in rows]


def store_files(directory: str) -> list[str]:
    return os.listdir(directory) if os.path.exists(directory) else []


def test_output_opens_with_datasets_and_ignores_uncommitted_files(tmp_path):
    import datasets

    url = str(tmp_path / "out")
    writer = writer_for(url)
    write_rows(writer, range(3))
    writer.commit()
    # An orphan from a crash and a temporary file of an interrupted write.
    fs = fsspec.filesystem("file")
    fs.pipe(f"{url}/_batchgen/pending/part-999999-deadbeef.parquet", b"garbage")
    fs.pipe(f"{url}/.part-000002-x.parquet.tmp-1234", b"garbage")
    assert pads.dataset(url).count_rows() == 3
    ds = datasets.load_dataset("parquet", data_files=f"{url}/*.parquet", split="train")
    assert sorted(ds["id"]) == ["id-0-0", "id-0-1", "id-0-2"]
    assert output_status(url)["uncommitted_parts"] == 1
    OutputDir(url).recover()
    assert output_status(url)["uncommitted_parts"] == 0 and not os.path.exists(f"{url}/.part-000002-x.parquet.tmp-1234")


def test_commits_on_an_object_store_are_single_puts():
    url = "memory://output-test/out"
    try:
        writer = writer_for(url)
        write_rows(writer, range(4))
        writer.commit()
        fs = fsspec.filesystem("memory")
        names = fs.ls("/output-test/out", detail=False)
        assert [n for n in names if n.endswith(".parquet")] and not any(".tmp-" in n for n in names)
        assert OutputDir(url).committed_rows().contains(0, 3)
        table, totals = read_output([url])
        assert table["_row_index"].to_pylist() == [0, 1, 2, 3] and totals["rows"] == 4
    finally:
        fsspec.filesystem("memory").rm("/output-test", recursive=True)


def test_schema_inference_for_jsonl_columns_keeps_every_value():
    rows = [Row(0, 0, "a", {"id": "a", "topic": "x", "score": 1, "tags": ["t"], "empty": None, "error": "mine"}),
            Row(0, 1, "b", {"topic": "y", "score": 2.5, "late": True})]
    schema = OutputSchema.for_job(spec(), None, rows)
    kept = schema.kept
    # The id column is the output's id; a column named like an output column is not passed through.
    assert kept.names == ["topic", "score", "tags", "empty", "late"]
    assert kept.field("score").type == pa.float64() and kept.field("empty").type == pa.string()
    assert kept_storage(schema)["tags"] == "JSON text" and kept_storage(schema)["late"] == "bool"
    table = schema.table([schema.failure(r, "boom") for r in rows])
    assert decode_json_columns(table)[0]["tags"] == ["t"] and table["score"].to_pylist() == [1.0, 2.5]
    # A value the rows it was decided from never showed is refused, never written as null.
    later = Row(0, 2, "c", {"topic": {"not": "a string"}, "score": 3})
    with pytest.raises(ValueError, match="kept column 'topic'"):
        schema.table([schema.failure(later, "boom")])
    assert OutputSchema.from_json(json.loads(json.dumps(schema.to_json()))).arrow == schema.arrow

    chosen = OutputSchema.for_job(spec(keep_columns=["score"]), None, rows)
    assert chosen.kept.names == ["score"]
    assert OutputSchema.for_job(spec(keep_columns="none"), None, rows).kept.names == []


def test_list_output_and_logprobs_columns():
    schema = OutputSchema(pa.schema([]), list_output=True, with_logprobs=True)
    row = Row(0, 0, "a")
    out = RequestOutput("0:0", None, [1], [
        CompletionOutput(0, "x", [7, 8], "length", logprobs=[{7: -0.1, 9: -2.0}, {8: -3.0, 4: -0.5, 5: -1.0}]),
        CompletionOutput(1, "y", [9], "stop", logprobs=[{9: -0.2}])])
    record = schema.success(Planned(row, params=SamplingParams(n=2, logprobs=1)), out)
    table = schema.table([record, schema.failure(Row(0, 1, "b"), "bad")])
    first, second = table.to_pylist()
    assert first["generated_text"] == ["x", "y"] and first["finish_reason"] == ["length", "stop"]
    assert first["num_generated_tokens"] == 3
    assert first["logprobs"][0][1] == {"token_id": 8, "logprob": -3.0, "top_logprobs": [{"token_id": 4, "logprob": -0.5}]}
    assert second["generated_text"] is None and second["finish_reason"] == ["error"] and second["error"] == "bad"


def test_merge_restores_input_order_across_parts_and_task_outputs(tmp_path):
    a, b = str(tmp_path / "task0"), str(tmp_path / "task1")
    wa, wb = writer_for(a, every_rows=2), writer_for(b)
    write_rows(wa, [5, 1])
    wa.commit()
    write_rows(wa, [3], shard=1)
    write_rows(wa, [0])
    wa.commit()
    write_rows(wb, [2, 4, 3])
    write_rows(wb, [0], shard=1)
    wb.commit()
    merged = str(tmp_path / "merged.parquet")
    with pytest.raises(OutputError, match=r"rows are missing, not finished: .*task0 \(4/10 rows\).*--allow-partial"):
        merge_outputs([a, b], merged)  # both outputs declare 10 rows: neither has finished
    totals = merge_outputs([a, b], merged, allow_partial=True)
    assert not totals["complete"] and len(totals["unfinished"]) == 2
    table = pads.dataset(merged).to_table()
    assert table["id"].to_pylist() == ["id-0-0", "id-0-1", "id-0-2", "id-0-3", "id-0-4", "id-0-5", "id-1-0", "id-1-3"]
    assert "_row_index" not in table.column_names and totals["rows"] == 8

    with pytest.raises(OutputError, match="more than one output"):
        merge_outputs([a, a], str(tmp_path / "dup.parquet"), allow_partial=True)
    other = OutputDir(str(tmp_path / "other"))
    other.write_manifest({"fingerprint": {"different": True}})
    with pytest.raises(OutputError, match="different job"):
        merge_outputs([a, str(tmp_path / "other")], str(tmp_path / "x.parquet"), allow_partial=True)
    with pytest.raises(OutputError, match="not a batchgen output"):
        output_status(str(tmp_path / "nowhere"))


def test_status_counts_rows_errors_and_skips(tmp_path):
    url = str(tmp_path / "out")
    writer = writer_for(url)
    write_rows(writer, range(6))
    writer.add(writer.schema.failure(Row(0, 6, "x"), "bad row"))
    writer.skip(Row(0, 7, "y"))
    writer.commit()
    st = output_status(url)
    assert (st["rows_done"], st["rows_total"], st["errors"], st["skipped"], st["complete"]) == (8, 10, 1, 1, False)
    assert st["generated_tokens"] == 12 and st["parts"] == 1


def test_a_committed_part_deleted_by_hand_is_reported(tmp_path):
    url = str(tmp_path / "out")
    writer = writer_for(url)
    write_rows(writer, range(2))
    writer.commit()
    (tmp_path / "out" / OutputDir(url).records()[0]["part"]).unlink()
    with pytest.raises(RuntimeError, match="are missing .* start over with --force"):
        OutputDir(url).recover()
