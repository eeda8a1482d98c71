"""Reading inputs: every format, bad lines as rows with errors, stable keys, skipping and shares."""

from __future__ import annotations

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from batchgen.job.reader import EVERY_ROW, Reader, RowShare
from batchgen.job.shards import resolve_shards
from batchgen.job.spec import InputSpec, JobSpecError
from tests.job.conftest import chat, write_jsonl


def spec(*paths, base_dir="/", **kw) -> InputSpec:
    return InputSpec(paths=tuple(str(p) for p in paths), base_dir=str(base_dir), **kw)


def read(*paths, base_dir="/", columns=None, share=EVERY_ROW, skip=None, **kw):
    s = spec(*paths, base_dir=base_dir, **kw)
    return list(Reader(resolve_shards(s), s, columns=columns, share=share, skip=skip))


def test_jsonl_bad_lines_become_rows_with_errors(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "hello"},
        b"",  # blank: not a row
        {"messages": chat("hi"), "temperature": 0.5},
        b'{"id": "c", "prompt": ',  # truncated
        b'{"id": "d", "prompt": "caf\xe9"}',  # latin-1, not UTF-8
        b"[1, 2]",
        {"id": 7, "prompt": None},
    ])
    rows = read(path, base_dir=tmp_path)
    assert [r.key for r in rows] == [(0, 0), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6)]
    a, b, c, d, e, f = rows
    assert (a.id, a.prompt, a.messages, a.error) == ("a", "hello", None, None)
    assert b.id == "in.jsonl:2" and b.messages == chat("hi") and b.data["temperature"] == 0.5
    assert c.id == "in.jsonl:3" and c.error.startswith("line 4: malformed JSON")
    assert d.error == "line 5: not valid UTF-8 (byte 0xe9 at offset 26)"
    assert e.error == "line 6: a JSON list is not a row; expected an object"
    assert f.id == "7" and f.prompt is None and f.error is None  # the planner decides a null prompt is bad


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".zst", zstandard.compress)])
def test_compressed_jsonl_reads_like_plain(tmp_path, suffix, compress):
    rows = [{"id": str(i), "prompt": f"p{i}"} for i in range(5)]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    packed = tmp_path / f"packed.jsonl{suffix}"
    packed.write_bytes(compress(plain.read_bytes()))
    assert [(r.id, r.prompt) for r in read(packed)] == [(r.id, r.prompt) for r in read(plain)]
    s = spec(packed)
    assert Reader(resolve_shards(s), s).count() == 5


def test_parquet_is_read_row_group_by_row_group_with_keys(tmp_path):
    table = pa.table({"prompt": [f"p{i}" for i in range(2500)], "topic": ["t"] * 2500,
                      "max_tokens": pa.array([None] * 2499 + [3], pa.int64())})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1000)
    rows = read(tmp_path / "a.parquet", base_dir=tmp_path)
    assert len(rows) == 2500 and rows[1234].key == (0, 1234) and rows[1234].prompt == "p1234"
    assert rows[1234].id == "a.parquet:1234" and rows[-1].data["max_tokens"] == 3
    # keep_columns: none reads prompts and overrides, not the other columns
    pruned = read(tmp_path / "a.parquet", columns=set())
    assert "topic" not in pruned[0].data and "max_tokens" in pruned[0].data
    # skipping committed rows keeps the keys of the others
    rest = read(tmp_path / "a.parquet", skip=lambda s, r: r % 3 != 0)
    assert [r.index for r in rest] == list(range(0, 2500, 3))
    assert rest[5].prompt == "p15"


def test_openai_batch_lines_map_onto_rows(tmp_path):
    path = write_jsonl(tmp_path / "batch.jsonl", [
        {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": chat("hi"), "max_completion_tokens": 5, "temperature": 0.2,
                  "top_p": 0.9, "seed": 3, "stop": ["\n"], "n": 1, "logprobs": True, "top_logprobs": 2,
                  "frequency_penalty": 0}},
        {"custom_id": "req-2", "url": "/v1/completions", "body": {"prompt": "Once upon", "max_tokens": 4}},
        {"custom_id": "req-3", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "req-4", "body": {"messages": chat("x"), "presence_penalty": 0.5, "functions": [{"name": "f"}]}},
        {"custom_id": "req-5"},
        b"not json",
    ])
    rows = read(path)
    assert resolve_shards(spec(path))[0].format == "openai-batch"  # detected from the first line
    one, two, three, four, five, six = rows
    assert one.id == "req-1" and one.messages == chat("hi") and one.error is None
    assert one.data == {"messages": chat("hi"), "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "seed": 3,
                        "stop": ["\n"], "n": 1, "logprobs": 2, "frequency_penalty": 0}
    assert two.prompt == "Once upon" and two.data["max_tokens"] == 4
    assert three.id == "req-3" and "url '/v1/embeddings' is not supported" in three.error
    assert four.error == "line 4: body.functions is not supported"
    assert five.error == "line 5: body is missing or not an object"
    assert six.id.endswith("batch.jsonl:5") and "malformed JSON" in six.error


def test_hf_datasets_from_disk_and_load_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"id": ["x", "y"], "prompt": ["one", "two"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    rows = read(tmp_path / "saved")  # auto: a save_to_disk directory is an HF dataset
    assert [(r.id, r.prompt, r.key) for r in rows] == [("x", "one", (0, 0)), ("y", "two", (0, 1))]

    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert [r.id for r in read(tmp_path / "dict", split="test")] == ["y"]
    with pytest.raises(JobSpecError, match="'valid' is not a split"):
        read(tmp_path / "dict", split="valid")

    # Anything load_dataset can read (here a local data directory), streamed.
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    rows = read(tmp_path / "hub", format="hf-dataset")
    assert [r.prompt for r in rows] == ["a", "b"]


def test_memory_filesystem_inputs():
    fs = fsspec.filesystem("memory")
    fs.pipe("/reader-test/b.jsonl", b'{"prompt": "b0"}\n{"prompt": "b1"}\n')
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["a0"]}), buf)
    fs.pipe("/reader-test/a.parquet", buf.getvalue().to_pybytes())
    try:
        shards = resolve_shards(spec("memory://reader-test/*"))
        assert [(s.name, s.format) for s in shards] == [("memory:///reader-test/a.parquet", "parquet"),
                                                        ("memory:///reader-test/b.jsonl", "jsonl")]
        rows = read("memory://reader-test/*")
        assert [(r.key, r.prompt) for r in rows] == [((0, 0), "a0"), ((1, 0), "b0"), ((1, 1), "b1")]
        assert rows[1].id == "memory:///reader-test/b.jsonl:0"
    finally:
        fs.rm("/reader-test", recursive=True)


def test_shard_resolution_order_directories_and_errors(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "_hidden.jsonl", ".tmp.jsonl", "notes.txt"):
        write_jsonl(tmp_path / "d" / name, [{"prompt": "x"}])
    names = [s.name for s in resolve_shards(spec(tmp_path / "d", base_dir=tmp_path))]
    assert names == ["d/a.jsonl", "d/b.jsonl"]  # sorted, hidden and unknown files left out
    listed = resolve_shards(spec(tmp_path / "d/b.jsonl", tmp_path / "d/*.jsonl", base_dir=tmp_path))
    # List order first, each file once, and a glob skips hidden files as pyarrow.dataset does.
    assert [s.name for s in listed] == ["d/b.jsonl", "d/a.jsonl"]
    assert [s.index for s in listed] == [0, 1]
    with pytest.raises(JobSpecError, match="matched no files"):
        resolve_shards(spec(tmp_path / "nothing*.jsonl"))
    with pytest.raises(JobSpecError, match="matched no files"):
        resolve_shards(spec(tmp_path / "missing.jsonl"))
    with pytest.raises(JobSpecError, match="cannot tell the format"):
        resolve_shards(spec(tmp_path / "d/notes.txt"))


def test_row_shares_partition_the_input(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(7)])
    pq.write_table(pa.table({"prompt": [str(i) for i in range(11)]}), tmp_path / "b.parquet")
    s = spec(tmp_path / "a.jsonl", tmp_path / "b.parquet")
    shards = resolve_shards(s)
    seen = []
    for task in range(3):
        reader = Reader(shards, s, share=RowShare(task, 3))
        keys = [r.key for r in reader]
        assert reader.count() == len(keys)
        seen += keys
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 18


def test_count_and_schema(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, b"", b"  ", {"prompt": "y"}, b"broken"])
    s = spec(tmp_path / "a.jsonl")
    reader = Reader(resolve_shards(s), s)
    assert reader.count() == 3 == len(list(reader))
    # JSONL declares no types: the reader decides them from every row (columns.py).
    assert reader.arrow_schema() == pa.schema([pa.field("prompt", pa.string())])
    pq.write_table(pa.table({"prompt": ["x"], "n": pa.array([1], pa.int8())}), tmp_path / "a.parquet")
    s = spec(tmp_path / "a.parquet")
    assert Reader(resolve_shards(s), s).arrow_schema().field("n").type == pa.int8()


def test_format_override_reads_any_extension_as_jsonl(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    assert [r.prompt for r in read(path, format="jsonl")] == ["x"]
