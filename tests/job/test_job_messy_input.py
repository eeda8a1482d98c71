"""Messy JSONL never stops a job or loses a value: the real CLI on the embedded model.

Scraped JSONL changes column types from row to row, holds lines that are not JSON, repeats ids and
grows columns late. The contract (README, "Messy input"): the job completes, every input line is in
the output exactly once, every kept value reads back as the JSON value it was (JSON-text columns
through json.loads), and of rows sharing an id only the first in input order is generated.
"""

from __future__ import annotations

import json
import math
import signal
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchgen.job import duplicates
from batchgen.job.columns import ColumnProfile, decode_json_columns, is_json_field, json_equal, source_key
from batchgen.job.duplicates import find_duplicates
from batchgen.job.reader import Reader, RowShare
from batchgen.job.shards import resolve_shards
from batchgen.job.spec import OUTPUT_COLUMNS, InputSpec
from tests.job.conftest import SMALL_ENGINE, chat, run_cli, write_job, write_jsonl

SHARD = "data.jsonl"


def make_job(root: Path, **sections) -> Path:
    spec = {"model": {"path": "smollm2-135m", "dtype": "float32"},
            "input": {"path": SHARD},
            "output": {"path": "out", "commit_every_rows": 3},
            "sampling": {"max_tokens": 2, "temperature": 0.0},
            "engine": SMALL_ENGINE,
            "on_error": "record"}
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return write_job(root / "job.yaml", **spec)


def output_rows(out: Path) -> list[dict]:
    """Every row any reader of OUT sees (pyarrow.dataset), JSON-text columns decoded, in input order."""
    table = pads.dataset(str(out)).to_table()
    return sorted(decode_json_columns(table), key=lambda r: (r["_shard_index"], r["_row_index"]))


def parse(line: bytes):
    """The oracle's reading of a line: its JSON value, or None when it is not a JSON object."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def expected_id(obj: dict | None, index: int) -> tuple[str, bool]:
    """(the output id of line `index`, whether that id is usable), as the README defines ids."""
    fallback = f"{SHARD}:{index}"
    value = None if obj is None else obj.get("id")
    if value is None:
        return fallback, obj is not None
    if isinstance(value, (bool, list, dict)):
        return fallback, False
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return fallback, False
        return value, True
    return str(value), True


def check_output(root: Path, lines: list[bytes]) -> list[dict]:
    """The three promises, against an independent reading of the input lines."""
    rows = output_rows(root / "out")
    objects = {i: parse(line) for i, line in enumerate(lines) if line.strip()}
    # 1. Every input line (blank lines are not rows) exactly once.
    assert [(r["_shard_index"], r["_row_index"]) for r in rows] == [(0, i) for i in objects]
    # 2. Every key of every object is a kept column (late ones too) whose value round-trips.
    column_of = {source_key(f): f.name for f in pads.dataset(str(root / "out")).schema
                 if f.name not in OUTPUT_COLUMNS}
    keys = {k for obj in objects.values() if obj for k in obj if k not in OUTPUT_COLUMNS}
    assert set(column_of) == keys
    for row in rows:
        obj = objects[row["_row_index"]]
        for key, name in column_of.items():
            want = None if obj is None else obj.get(key)
            assert json_equal(row[name], want), (row["_row_index"], key, row[name], want)
        if obj is None:
            assert row["error"], row
    # 3. Of the rows sharing an id (every row has one, generated ids included), the first in input
    #    order may be generated; each later one with a usable id is an error row naming the first.
    first: dict[str, int] = {}
    for row, (index, obj) in zip(rows, objects.items(), strict=True):
        row_id, usable = expected_id(obj, index)
        assert row["id"] == row_id
        if usable and row_id in first:
            assert row["error"] == (f"duplicate id {json.dumps(row_id, ensure_ascii=False)}: {SHARD} line {first[row_id] + 1} has "
                                    "it first; ids must be unique, so only that row is generated")
        else:
            assert "duplicate id" not in (row["error"] or "")
        first.setdefault(row_id, index)
    generated = [r["id"] for r in rows if r["error"] is None]
    assert len(generated) == len(set(generated))
    return rows


# ---- the hypothesis suite: random rows, random types, random bad lines --------------------------

SPECIAL_TEXT = ["", "\x00", "a\x00b", "\ud800", "x\udfffy", "é", "🙂", "line\nbreak", "{\"not\": json}"]
text = st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-5, 5),
                    st.floats(allow_nan=True, allow_infinity=True), text)


def _containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3))


json_values = st.recursive(scalars, _containers, max_leaves=8)
COLUMNS = ["c0", "c1", "meta", "nul\x00col", "\ud800col", "é"]
BAD_LINES = [b'{"id": "x", "prompt": "unterminated', b"\xff\xfe not utf-8", b"[1, 2]", b"42", b"null",
             b'"a string"', b"[" * 3000 + b"]" * 3000, b'{"a": ' * 3000 + b"1" + b"}" * 3000, b"", b"   "]


@st.composite
def rows_strategy(draw):
    row: dict = {}
    which = draw(st.sampled_from(["missing", "pool", "pool", "int", "null", "bad"]))
    if which == "pool":
        row["id"] = draw(st.sampled_from(["a", "b", "c", "d"]))
    elif which == "int":
        row["id"] = draw(st.integers(0, 3))
    elif which == "null":
        row["id"] = None
    elif which == "bad":
        row["id"] = draw(st.one_of(st.booleans(), st.lists(st.integers(), max_size=2)))
    kind = draw(st.sampled_from(["prompt", "prompt", "messages", "messages", "wrong prompt", "wrong messages",
                                 "neither"]))
    if kind == "prompt":
        row["prompt"] = draw(text)
    elif kind == "messages":
        row["messages"] = chat(draw(text))
    elif kind == "wrong prompt":
        row["prompt"] = draw(json_values)
    elif kind == "wrong messages":
        row["messages"] = draw(json_values)
    for name in draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=4)):
        row[name] = draw(json_values)
    if draw(st.booleans()):
        row["max_tokens"] = draw(st.sampled_from([1, 2, 0, -1, True, "2", 2.0, 2.5, None, 10**30, [1]]))
    if draw(st.booleans()):
        row["temperature"] = draw(st.sampled_from([0, 0.0, 0.7, math.nan, math.inf, "hot", True, -1, None]))
    return row


@st.composite
def jsonl_files(draw) -> list[bytes]:
    items = draw(st.lists(st.one_of(rows_strategy(), rows_strategy(), st.sampled_from(BAD_LINES)),
                          min_size=3, max_size=12))
    half = len(items) // 2
    lines = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and i >= half and draw(st.booleans()):
            item["late"] = draw(json_values)  # a column no early row has
        lines.append(item if isinstance(item, bytes) else json.dumps(item).encode())
    return lines


@pytest.mark.slow
@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(lines=jsonl_files())
def test_random_messy_jsonl_completes_with_every_line_once_and_every_value_kept(tiny_dir, lines):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jsonl(root / SHARD, lines)
        # A 2-layer model with SmolLM2's vocabulary: the job layer is under test, not the model.
        job = make_job(root, model={"path": tiny_dir}, input={"group_window": 4})  # several windows: late columns come after the first
        result = run_cli("run", "-q", str(job), cwd=root)
        assert result.returncode == 0, result.stderr
        rows = check_output(root, lines)
        stats = json.loads((root / "out" / "_batchgen" / "stats.json").read_text())
        assert stats["job"]["complete"] and stats["job"]["rows_done"] == len(rows)
        if rows:  # every line blank: nothing to merge
            merged = root / "merged.parquet"
            assert run_cli("merge", str(root / "out"), "--to", str(merged), cwd=root).returncode == 0
            internal = ("_shard_index", "_row_index")
            assert json_equal(decode_json_columns(pq.read_table(merged)),
                              [{k: v for k, v in r.items() if k not in internal} for r in rows])


# ---- the cases of the issue, one by one -------------------------------------------------------

TYPE_CHANGES = [
    {"id": "r0", "messages": chat("Name a color."), "score": 7, "big": 1, "ratio": 0.5, "tags": ["a"]},
    {"id": "r1", "messages": chat("Name a fruit."), "score": True, "big": 2**64 + 1, "ratio": math.nan},
    {"id": "r2", "messages": "What is 2 + 2?", "score": 3, "big": -(2**70), "ratio": 1},
    {"id": "r3", "messages": None, "prompt": "The sky is", "score": None, "ratio": math.inf},
    {"id": "r4", "prompt": "Water is", "nested": {"a": [1, {"b": None}], "c": "d"}, "deep": [[[[[[[[1]]]]]]]]},
    {"id": "r5", "prompt": "Fire is", "late": "first seen on line 6", "tags": "not a list"},
]


@pytest.mark.slow
def test_type_changes_are_kept_as_json_text_and_named_by_validate_and_stats(tmp_path):
    write_jsonl(tmp_path / SHARD, TYPE_CHANGES)
    job = make_job(tmp_path, input={"group_window": 2})  # the first window sees neither r2's string nor `late`
    check = run_cli("validate", str(job), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    report = " ".join(check.stdout.split())
    assert "kept columns, as the output stores them:" in report
    for line in ("messages JSON text (values: list in 2 rows, string in 1 row, null in 1 row)",
                 "score JSON text (values: int in 2 rows, bool in 1 row, null in 1 row)",
                 "big JSON text (values: big int in 2 rows, int in 1 row)",
                 "ratio double", "late string", "tags JSON text"):
        assert line in report, check.stdout

    result = run_cli("run", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = check_output(tmp_path, [json.dumps(r).encode() for r in TYPE_CHANGES])
    assert [r["error"] for r in rows] == [None, None, rows[2]["error"], None, None, None]
    assert "'messages' must be a non-empty list" in rows[2]["error"]
    assert rows[1]["big"] == 2**64 + 1 and math.isnan(rows[1]["ratio"]) and rows[1]["score"] is True
    assert rows[4]["deep"] == [[[[[[[[1]]]]]]]] and rows[5]["late"] == "first seen on line 6"

    stats = json.loads((tmp_path / "out" / "_batchgen" / "stats.json").read_text())
    assert stats["kept_columns"] == {"messages": "JSON text", "score": "JSON text", "big": "JSON text",
                                     "ratio": "double", "tags": "JSON text", "prompt": "string",
                                     "nested": "JSON text", "deep": "JSON text", "late": "string"}
    schema = pads.dataset(str(tmp_path / "out")).schema
    assert is_json_field(schema.field("messages")) and not is_json_field(schema.field("late"))
    # merge reads every part as one table with the same storage.
    merged = tmp_path / "merged.parquet"
    assert run_cli("merge", str(tmp_path / "out"), "--to", str(merged), cwd=tmp_path).returncode == 0
    assert [r["score"] for r in decode_json_columns(pq.read_table(merged))] == [7, True, 3, None, None, None]


BAD_CONTENT = [
    {"id": "ok", "prompt": "Once upon a time"},
    {"id": "nul", "prompt": "a\x00b"},
    {"id": "surrogate", "prompt": "broken \ud800 text"},
    {"id": "bad-\udc00-id", "prompt": "fine"},
    {"id": ["a", "list"], "prompt": "fine"},
    {"id": "sampling", "prompt": "fine", "temperature": math.nan, "seed": 2**70, "max_tokens": True},
    {"id": "wrong-messages", "messages": [{"role": 7, "content": None}]},
    b"\xc3\x28 not utf-8",
    b"[1, 2, 3]",
    b'{"id": "cut", "prompt": ',
    {"id": "big", "prompt": "Hello", "blob": "x" * (10 << 20)},
    {"id": "last", "prompt": "Dogs are"},
]


@pytest.mark.slow
def test_bad_row_content_becomes_error_rows_or_skips_and_only_fail_stops(tmp_path):
    write_jsonl(tmp_path / SHARD, BAD_CONTENT)
    lines = (tmp_path / SHARD).read_bytes().split(b"\n")[:-1]
    result = run_cli("run", str(make_job(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = check_output(tmp_path, lines)
    errors = {r["_row_index"]: r["error"] for r in rows}
    assert [i for i, e in errors.items() if e is None] == [0, 1, 10, 11]
    assert "cannot be tokenized" in errors[2]
    assert "'id' is not valid Unicode" in errors[3] and "'id' must be a string or a number" in errors[4]
    assert errors[5].startswith("per-row ") and "is invalid" in errors[5]
    assert "not valid UTF-8" in errors[7] and "a JSON list is not a row" in errors[8]
    assert errors[9].startswith("line 10: malformed JSON")
    assert len(rows[10]["blob"]) == 10 << 20

    skip = make_job(tmp_path / "skip", on_error="skip", input={"path": str(tmp_path / SHARD)})
    result = run_cli("run", str(skip), cwd=tmp_path / "skip")
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "skip" / "out" / "_batchgen" / "stats.json").read_text())
    assert stats["job"]["skipped"] == 8 and stats["job"]["rows"] == 4 and stats["job"]["complete"]

    fail = make_job(tmp_path / "fail", on_error="fail", input={"path": str(tmp_path / SHARD)})
    result = run_cli("run", str(fail), cwd=tmp_path / "fail")
    assert result.returncode != 0
    # The first bad row of the window stops the job, named by its line.
    assert f"({tmp_path / SHARD} line 4): 'id' is not valid Unicode" in result.stderr, result.stderr


DUPLICATES = [{"id": ["a", "b", "a", "c", "b", "a", "d", "c"][i], "prompt": f"Fact {i} about the sea:"}
              for i in range(8)]
DUPLICATES.insert(4, {"prompt": "no id: this row's id is data.jsonl:4"})
DUPLICATES.insert(6, {"id": "data.jsonl:4", "prompt": "an id that a generated id already took"})


@pytest.mark.slow
def test_duplicate_ids_are_error_rows_after_the_first_and_resume_stays_exactly_once(tmp_path):
    write_jsonl(tmp_path / SHARD, DUPLICATES)
    lines = (tmp_path / SHARD).read_bytes().split(b"\n")[:-1]
    job = make_job(tmp_path, input={"group_window": 3}, output={"commit_every_rows": 2},
                   engine={"max_num_seqs": 1})
    check = run_cli("validate", str(job), cwd=tmp_path)
    assert "duplicate ids: 5 row(s) repeat the id of an earlier row" in check.stdout, check.stdout
    # Killed mid-run twice (after a commit, then while generating), then resumed to the end.
    for point in ("record_written=2", "engine_step=3"):
        crashed = run_cli("run", "-q", str(job), cwd=tmp_path, env={"BATCHGEN_FAILPOINTS": point})
        assert crashed.returncode == -signal.SIGKILL, (point, crashed.stderr)
    final = run_cli("run", str(job), cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    rows = check_output(tmp_path, lines)
    assert [r["id"] for r in rows if r["error"] is None] == ["a", "b", "c", "data.jsonl:4", "d"]
    assert len(rows) == 10 and sum("duplicate id" in (r["error"] or "") for r in rows) == 5

    # Each task of an array reads its own share but decides duplicates over the whole input alike.
    for task in (0, 1):
        arr = run_cli("run", "-q", str(job), "--num-tasks", "2", "--task-index", str(task),
                      "--set", "output.path=array", cwd=tmp_path)
        assert arr.returncode == 0, arr.stderr
    array_rows = sorted(decode_json_columns(pads.dataset(str(tmp_path / "array")).to_table()),
                        key=lambda r: r["_row_index"])
    assert [(r["id"], r["error"]) for r in array_rows] == [(r["id"], r["error"]) for r in rows]


# ---- the pieces, without the model --------------------------------------------------------------

def test_column_storage_rules():
    profile = ColumnProfile()
    for row in [{"s": "x", "b": True, "i": 1, "f": 1, "big": 1, "mix": 7, "obj": {}, "bad": "ok", "nul": None},
                {"s": None, "b": False, "i": -5, "f": 2.5, "big": 2**63, "mix": True, "obj": None, "bad": "\ud800"},
                {"f": 3, "exactness": 2**53 + 1, "exactness2": 0.5}]:
        profile.add(row)
    types = {name: ("JSON text" if is_json_field(f) else str(f.type)) for name, f in
             zip(profile.schema().names, profile.schema(), strict=True)}
    assert types == {"s": "string", "b": "bool", "i": "int64", "f": "double", "big": "JSON text",
                     "mix": "JSON text", "obj": "JSON text", "bad": "JSON text", "nul": "string",
                     "exactness": "int64", "exactness2": "double"}
    inexact = ColumnProfile()
    inexact.add({"x": 2**53 + 1})
    inexact.add({"x": 0.5})
    assert is_json_field(inexact.field("x"))  # a double would round 2**53 + 1


def test_duplicates_are_exact_even_when_hashes_collide(monkeypatch):
    ids = [(0, 0, "a"), (0, 1, "b"), (0, 2, "a"), (1, 0, "c"), (1, 5, "b"), (1, 6, "a")]
    want = {(0, 2): (0, 0), (1, 5): (0, 1), (1, 6): (0, 0)}
    assert find_duplicates(lambda: iter(ids)) == want
    monkeypatch.setattr(duplicates, "_hash", lambda row_id: 7)  # every id collides: the second pass decides
    assert find_duplicates(lambda: iter(ids)) == want
    assert find_duplicates(lambda: iter(ids[:2])) == {}


def test_reader_decides_duplicates_over_the_whole_input_whatever_the_share(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "1"}, {"id": "y", "prompt": "2"}, b"{broken",
                                       {"id": "x", "prompt": "3"}])
    pq.write_table(pa.table({"id": ["y", "z", "x"], "prompt": ["4", "5", "6"]}), tmp_path / "b.parquet")
    spec = InputSpec(paths=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")))
    shards = resolve_shards(spec)
    whole = {r.key: r.error for r in Reader(shards, spec)}
    assert {k for k, e in whole.items() if e and "duplicate id" in e} == {(0, 3), (1, 0), (1, 2)}
    assert 'duplicate id "y": ' + f"{shards[0].name} line 2 has it first" in whole[(1, 0)]
    shares = {}
    for task in range(3):  # each task sees a third of the rows, and the same verdict on each
        shares.update({r.key: r.error for r in Reader(shards, spec, share=RowShare(task, 3))})
    assert shares == whole
    # A resume skips committed rows before parsing them; the later duplicates are still found.
    resumed = {r.key: r.error for r in Reader(shards, spec, skip=lambda s, i: (s, i) in {(0, 0), (0, 1)})}
    assert resumed == {k: e for k, e in whole.items() if k not in {(0, 0), (0, 1)}}


def test_reader_schema_covers_late_columns_and_shards_that_disagree(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "n": "seven"}] + [{"prompt": "p"}] * 50
                + [{"prompt": "p", "late": 1.5}])
    pq.write_table(pa.table({"prompt": ["q"], "n": [7], "only_parquet": [True]}), tmp_path / "b.parquet")
    spec = InputSpec(paths=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")))
    schema = Reader(resolve_shards(spec), spec).arrow_schema()
    assert schema.field("late").type == pa.float64() and schema.field("only_parquet").type == pa.bool_()
    assert is_json_field(schema.field("n"))  # int64 in the Parquet shard, a string in the JSONL one
    assert Reader(resolve_shards(spec), spec, columns=set()).arrow_schema().names == ["prompt", "n", "only_parquet"]
