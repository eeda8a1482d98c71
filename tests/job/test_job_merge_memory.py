"""`batchgen merge` streams: merging 1M committed rows stays in bounded memory, in input order.

The output is written directly as parts through the output directory's owner (no model): two
writers commit interleaved rows side by side (even and odd rows, as two data-parallel workers do),
5000 rows per part, over two shards. The merge runs in a fresh child process, after a merge of
50k rows that warms it up (the libraries' code pages, allocator pools and threads); then
resource.getrusage's ru_maxrss (peak resident set, KiB on Linux) after the 1M-row merge may exceed
the peak before it by less than 64 MiB, while the rows' column data alone is ~135 MB in Arrow:
loading every part, as merge did before, grows it by ~450 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.manifest import encode_keys
from batchgen.job.outdir import JobOutput
from batchgen.job.outputs import OutputError, merge_outputs

BOUND_MIB = 64
PART_ROWS = 5000
FILLER = "x" * 100

CHILD = """
import json, resource, sys
from batchgen.job.outputs import merge_outputs

merge_outputs([sys.argv[3]], sys.argv[2])  # warm up: libraries' pages, allocator pools, threads
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
totals = merge_outputs([sys.argv[1]], sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": totals["rows"], "complete": totals["complete"], "growth_kib": peak - base}))
"""


def write_output(url: str, shard_rows: list[int], part_rows: int = PART_ROWS, duplicate: bool = False) -> int:
    """Commit the rows of `shard_rows` (rows per shard) as parts of two interleaved writers."""
    out = JobOutput(url).root
    out.write_manifest({"fingerprint": {"job": "merge-test"}, "total_rows": sum(shard_rows)})
    step = part_rows * 2  # each part: every other row of `step` consecutive rows
    for shard, n in enumerate(shard_rows):
        for start in range(0, n, step):
            for writer in (0, 1):
                rows = list(range(start + writer, min(start + step, n), 2))
                if duplicate and shard == 0 and start == 0 and writer == 1:
                    rows.append(0)  # a row the other writer committed too
                if rows:
                    _commit(out, shard, rows)
    return sum(shard_rows)


def _commit(out, shard: int, rows: list[int]) -> None:
    table = pa.table({
        "id": [f"s{shard}-{r:07d}" for r in rows],
        "generated_text": [f"{FILLER}{r}" for r in rows],
        "error": pa.nulls(len(rows), pa.string()),
        "_shard_index": pa.array([shard] * len(rows), pa.int32()),
        "_row_index": pa.array(rows, pa.int64()),
    })
    out.commit(lambda f: pq.write_table(table, f), {
        "rows": encode_keys((shard, r) for r in rows), "skipped": {}, "num_rows": len(rows), "num_errors": 0,
        "num_skipped": 0, "num_prompt_tokens": 0, "num_generated_tokens": 0, "num_cached_tokens": 0})


@pytest.mark.slow  # writes and merges 1M rows
def test_merging_a_million_rows_streams_in_bounded_memory(tmp_path):
    url, merged = str(tmp_path / "out"), str(tmp_path / "merged.parquet")
    total = write_output(url, [600_000, 400_000])
    write_output(str(tmp_path / "small"), [50_000])
    proc = subprocess.run([sys.executable, "-c", CHILD, url, merged, str(tmp_path / "small")], capture_output=True,
                          text=True, check=True, timeout=600)
    result = json.loads(proc.stdout)
    assert result["rows"] == total and result["complete"]
    assert result["growth_kib"] < BOUND_MIB * 1024, result
    f = pq.ParquetFile(merged)
    assert f.metadata.num_rows == total and "_row_index" not in f.schema_arrow.names
    previous = None
    for batch in f.iter_batches(columns=["id"], batch_size=100_000):  # every row once, in input order
        ids = batch.column(0).to_pylist()
        assert ids == sorted(ids) and (previous is None or previous < ids[0])
        previous = ids[-1]
    assert previous == "s1-0399999"


def test_merge_writes_parquet_or_jsonl_atomically_in_input_order(tmp_path):
    url = str(tmp_path / "out")
    write_output(url, [23, 7], part_rows=3)
    expected = [f"s0-{r:07d}" for r in range(23)] + [f"s1-{r:07d}" for r in range(7)]
    merge_outputs([url], str(tmp_path / "m.parquet"))
    assert pq.read_table(tmp_path / "m.parquet")["id"].to_pylist() == expected
    merge_outputs([url], str(tmp_path / "m.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == expected
    assert lines[0] == {"id": "s0-0000000", "generated_text": f"{FILLER}0", "error": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "m.parquet", "out"]  # no temporary left

    bad = str(tmp_path / "bad")
    write_output(bad, [10], part_rows=2, duplicate=True)
    with pytest.raises(OutputError, match=r"input row \(shard 0, row 0\) is in more than one output part"):
        merge_outputs([bad], str(tmp_path / "bad.jsonl"))
    assert not (tmp_path / "bad.jsonl").exists()  # a merge that fails leaves nothing, not half a file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_to_jsonl_writes_json_text_columns_as_their_values(tmp_path):
    """A kept column stored as JSON text (columns.py) goes out of a JSONL merge as the value it holds."""
    from batchgen.job.columns import JSON_STORAGE, STORAGE_KEY

    url = str(tmp_path / "out")
    out = JobOutput(url).root
    out.write_manifest({"fingerprint": {"job": "merge-test"}, "total_rows": 3})
    values = [[1, "a", {"b": None}], "plain", None]
    meta = pa.field("meta", pa.string(), metadata={STORAGE_KEY: JSON_STORAGE})
    table = pa.Table.from_arrays([
        pa.array(["r0", "r1", "r2"]), pa.array([json.dumps(v) if v is not None else None for v in values]),
        pa.array(["x", "y", "z"]), pa.nulls(3, pa.string()), pa.array([0, 0, 0], pa.int32()),
        pa.array([0, 1, 2], pa.int64())],
        schema=pa.schema([pa.field("id", pa.string()), meta, pa.field("generated_text", pa.string()),
                          pa.field("error", pa.string()), pa.field("_shard_index", pa.int32()),
                          pa.field("_row_index", pa.int64())]))
    out.commit(lambda f: pq.write_table(table, f), {
        "rows": encode_keys((0, r) for r in range(3)), "skipped": {}, "num_rows": 3, "num_errors": 0,
        "num_skipped": 0, "num_prompt_tokens": 0, "num_generated_tokens": 0, "num_cached_tokens": 0})
    merge_outputs([url], str(tmp_path / "m.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [line["meta"] for line in lines] == values
    assert [line["generated_text"] for line in lines] == ["x", "y", "z"]
