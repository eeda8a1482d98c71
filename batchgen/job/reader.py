"""Stream input rows from shards in bounded memory, each with a stable key and id.

A row's key is (shard index, row index): row index is the row's position in a Parquet file or
dataset, or its line number (from 0) in a JSONL file. Keys are unique even when user ids repeat,
which is what makes "every input row exactly once in the output" checkable and resumable.

Ids that repeat are still rows of their own: the first row (in input order) with an id is generated,
every later row with the same id comes out with `error` naming the first one (duplicates.py finds
them over the whole input, so every run, task and worker agrees on which is first).

Memory stays bounded whatever the input size: Parquet is read one record batch at a time (one
row group in memory), JSONL one line at a time, HF datasets through their memory-mapped or
streaming iterators. A line that cannot be parsed is still a row, with `error` saying why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.job.columns import ColumnProfile, is_json_field, json_field
from batchgen.job.duplicates import find_duplicates
from batchgen.job.openai_batch import OpenAIBatchError, parse_line
from batchgen.job.shards import Shard, is_saved_dataset
from batchgen.job.spec import InputSpec, JobSpecError
from batchgen.job.store import read_lines
from batchgen.sampling import SamplingParams

_BATCH_ROWS = 1024
SAMPLING_FIELDS = frozenset(SamplingParams.field_names())
ROW_OVERRIDES = SAMPLING_FIELDS | {"chat_template_kwargs"}  # columns read whenever present


@dataclass(slots=True)
class Row:
    shard: int
    index: int
    id: str
    data: dict[str, Any] = field(default_factory=dict)  # input columns: passed through and read for overrides
    prompt: Any = None
    messages: Any = None
    error: str | None = None  # set when the row could not even be parsed

    @property
    def key(self) -> tuple[int, int]:
        return self.shard, self.index

    @property
    def request_id(self) -> str:
        return f"{self.shard}:{self.index}"


@dataclass(frozen=True)
class RowShare:
    """Task `index` of `count` takes every count-th row, offset by the shard index so that many small
    shards still spread over all tasks. Deterministic: a requeued task gets the same rows again."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"task index {self.index} is outside [0, {self.count})")

    def takes(self, shard: int, row: int) -> bool:
        return (shard + row) % self.count == self.index

    def size(self, shard: int, num_rows: int) -> int:
        first = (self.index - shard) % self.count
        return max(0, (num_rows - first + self.count - 1) // self.count)


EVERY_ROW = RowShare()  # a job that is not split into tasks
RowFilter = Callable[[int, int], bool]  # (shard, row) -> skip it (already committed)


class Reader:
    """Iterate the rows of a job's shards, skipping committed keys before paying to parse them."""

    def __init__(self, shards: list[Shard], spec: InputSpec, *, columns: set[str] | None = None,
                 share: RowShare = EVERY_ROW, skip: RowFilter | None = None):
        self.shards = shards
        self.spec = spec
        self.columns = columns  # None: every column (keep_columns: all)
        self.share = share
        self.skip = skip
        self._schema: pa.Schema | None = None  # arrow_schema(), once computed
        self._duplicates: dict[tuple[int, int], tuple[int, int]] | None = None
        self.column_profile: ColumnProfile | None = None  # of the untyped shards, once arrow_schema() ran

    def _wanted(self, shard: int, row: int) -> bool:
        return self.share.takes(shard, row) and not (self.skip and self.skip(shard, row))

    def __iter__(self) -> Iterator[Row]:
        for shard in self.shards:
            yield from self.rows(shard)

    def rows(self, shard: Shard) -> Iterator[Row]:
        duplicates = self.duplicates()
        for row in self._rows(shard, self._wanted, self._read_columns()):
            first = duplicates.get(row.key) if duplicates else None
            if first is not None and row.error is None:
                row.error = (f"duplicate id {_short(row.id)}: {self.where(*first)} has it first; "
                             "ids must be unique, so only that row is generated")
            yield row

    def _rows(self, shard: Shard, wanted: RowFilter, columns: set[str] | None) -> Iterator[Row]:
        if shard.format == "parquet":
            yield from self._plain_rows(shard, _parquet_records(shard, columns, wanted))
        elif shard.format == "hf-dataset":
            yield from self._plain_rows(shard, _hf_records(shard, self.spec.split, wanted))
        elif shard.format == "jsonl":
            yield from self._plain_rows(shard, _jsonl_records(shard, wanted))
        elif shard.format == "openai-batch":
            yield from _openai_rows(shard, _jsonl_records(shard, wanted))
        else:
            raise ValueError(f"unknown shard format {shard.format!r}")

    def where(self, shard: int, index: int) -> str:
        """Where a row is, as a user finds it: "data.jsonl line 4" (JSONL counts lines from 1), "a.parquet row 3"."""
        s = self.shards[shard]
        return f"{s.name} line {index + 1}" if s.format in ("jsonl", "openai-batch") else f"{s.name} row {index}"

    def duplicates(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{key of a row whose id an earlier row has: key of the first row with that id}, over the
        whole input (every task's share): computed once per reader, by one pass over the ids."""
        if self._duplicates is None:
            if self.spec.id_column is None and all(s.format != "openai-batch" for s in self.shards):
                self._duplicates = {}  # generated ids (shard:line) are unique
            else:
                self._duplicates = find_duplicates(self._all_ids)
        return self._duplicates

    def _all_ids(self) -> Iterator[tuple[int, int, str]]:
        """(shard, row, id) of every row of the input, in input order."""
        everything = lambda shard, row: True  # noqa: E731
        id_only = {self.spec.id_column} if self.spec.id_column else set()
        for shard in self.shards:
            for row in self._rows(shard, everything, id_only):
                yield row.shard, row.index, row.id

    def _read_columns(self) -> set[str] | None:
        if self.columns is None:
            return None
        s = self.spec
        return self.columns | ROW_OVERRIDES | {c for c in (s.id_column, s.prompt_column, s.messages_column) if c}

    def _plain_rows(self, shard: Shard, records: Iterator[tuple[int, Any, str | None]]) -> Iterator[Row]:
        s = self.spec
        for index, data, error in records:
            if error is not None:
                yield Row(shard.index, index, _fallback_id(shard, index), error=error)
                continue
            row_id, error = _row_id(data.get(s.id_column) if s.id_column else None, shard, index, s.id_column)
            yield Row(shard.index, index, row_id, data,
                      prompt=data.get(s.prompt_column) if s.prompt_column else None,
                      messages=data.get(s.messages_column) if s.messages_column else None, error=error)

    def count(self) -> int | None:
        """Rows this reader's share covers (committed ones included); None when counting means a full
        read of a remote file."""
        total = 0
        for shard in self.shards:
            n = self._count_shard(shard)
            if n is None:
                return None
            total += n
        return total

    def _count_shard(self, shard: Shard) -> int | None:
        if shard.format == "parquet":
            fs, path = fsspec.core.url_to_fs(shard.url)
            with fs.open(path, "rb") as f:
                return self.share.size(shard.index, pq.ParquetFile(f).metadata.num_rows)
        if shard.format == "hf-dataset":
            n = _hf_num_rows(shard, self.spec.split)
            return None if n is None else self.share.size(shard.index, n)
        if not shard.url.startswith("memory://") and "://" in shard.url:
            return None  # counting would download the whole file once more
        return sum(1 for i, line in enumerate(read_lines(shard.url)) if line.strip() and self.share.takes(shard.index, i))

    def arrow_schema(self) -> pa.Schema:
        """The input columns' types: as Parquet and HF datasets declare them; for JSONL, OpenAI batch
        files and undeclared HF datasets, as columns.py decides them from a pass over every row.

        Computed once per reader. Only the reader's columns are profiled (None: all of them).
        """
        if self._schema is None:
            self._schema = self._input_schema()
        return self._schema

    def _input_schema(self) -> pa.Schema:
        declared, untyped = [], []
        for shard in self.shards:
            if shard.format == "parquet":
                fs, path = fsspec.core.url_to_fs(shard.url)
                with fs.open(path, "rb") as f:
                    declared.append(pq.read_schema(f))
            elif shard.format == "hf-dataset" and (features := _open_hf(shard.url, self.spec.split).features):
                declared.append(features.arrow_schema)
            else:
                untyped.append(shard)
        try:
            schema = pa.unify_schemas(declared, promote_options="permissive") if declared else pa.schema([])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise JobSpecError(f"input: the shards disagree on column types: {e}") from None
        if not untyped or self.columns == set():
            return schema  # keep_columns: none (without a LoRA column) keeps nothing to profile
        profile = self.column_profile = self.profile(untyped)
        fields = {f.name: f for f in schema}
        for key in profile.kinds:
            f = profile.field(key)
            name, have = f.name, fields.get(f.name)
            if have is None:
                fields[name] = f
            elif set(profile.kinds[key]) != {"null"} and (have.type != f.type or is_json_field(f)):
                fields[name] = json_field(key)  # Parquet and JSONL shards disagree: keep both as JSON text
        return pa.schema(list(fields.values()))

    def profile(self, shards: list[Shard] | None = None) -> ColumnProfile:
        """The kinds of value each column holds, over every row of `shards` (default: all)."""
        profile = ColumnProfile()
        everything = lambda shard, row: True  # noqa: E731
        for shard in self.shards if shards is None else shards:
            for row in self._rows(shard, everything, self.columns):
                if row.data:
                    profile.add(row.data, self.columns)
        return profile


def _fallback_id(shard: Shard, index: int) -> str:
    return f"{shard.name}:{index}"


def _row_id(value: Any, shard: Shard, index: int, column: str | None) -> tuple[str, str | None]:
    """(the row's id, an error when the id column holds something that cannot be an id)."""
    if value is None:
        return _fallback_id(shard, index), None
    if isinstance(value, (bool, list, dict)):
        return _fallback_id(shard, index), (f"{column!r} must be a string or a number to be an id, "
                                            f"got {_short(value)}")
    if isinstance(value, str):
        if not _valid_unicode(value):
            return _fallback_id(shard, index), f"{column!r} is not valid Unicode (a lone surrogate): {_short(value)}"
        return value, None
    return str(value), None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any, limit: int = 80) -> str:
    # Valid text reads as itself; anything else (a lone surrogate, a list) with ASCII escapes.
    text = json.dumps(value, ensure_ascii=not (isinstance(value, str) and _valid_unicode(value)), default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- formats: each yields (row index, columns or None, error or None) ---------------------------

def _parquet_records(shard: Shard, columns: set[str] | None, wanted: Callable[[int, int], bool]):
    fs, path = fsspec.core.url_to_fs(shard.url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        read = names if columns is None else [c for c in names if c in columns]
        start = 0
        # iter_batches decodes one row group at a time: memory follows the row group, not the file.
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=read):
            n = batch.num_rows
            keep = [i for i in range(n) if wanted(shard.index, start + i)]
            if keep:
                records = (batch if len(keep) == n else batch.take(keep)).to_pylist() if read else [{}] * len(keep)
                for i, record in zip(keep, records, strict=True):
                    yield start + i, record, None
            start += n


def _jsonl_records(shard: Shard, wanted: Callable[[int, int], bool]):
    for index, raw in enumerate(read_lines(shard.url)):
        if not raw.strip() or not wanted(shard.index, index):
            continue  # a blank line is not a row; a committed one is not parsed again
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield index, None, f"line {index + 1}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            yield index, None, f"line {index + 1}: malformed JSON: {e}"
            continue
        except RecursionError:
            yield index, None, f"line {index + 1}: JSON nested too deeply to read"
            continue
        if not isinstance(obj, dict):
            yield index, None, f"line {index + 1}: a JSON {type(obj).__name__} is not a row; expected an object"
            continue
        yield index, obj, None


def _openai_rows(shard: Shard, records) -> Iterator[Row]:
    for index, obj, error in records:
        row_id = _fallback_id(shard, index)
        if error is None:
            row_id, error = _row_id(obj.get("custom_id"), shard, index, "custom_id")
        if error is None:
            try:
                columns = parse_line(obj)
            except OpenAIBatchError as e:
                error = f"line {index + 1}: {e}"
            else:
                yield Row(shard.index, index, row_id, columns, prompt=columns.get("prompt"),
                          messages=columns.get("messages"))
                continue
        yield Row(shard.index, index, row_id, error=error)


def _hf_records(shard: Shard, split: str | None, wanted: Callable[[int, int], bool]):
    for index, record in enumerate(_open_hf(shard.url, split)):
        if wanted(shard.index, index):
            yield index, record, None


def _open_hf(url: str, split: str | None):
    """A saved dataset (save_to_disk, memory-mapped) or anything load_dataset reads, streamed."""
    import datasets  # slow to import: only jobs that read HF datasets pay for it

    try:
        if is_saved_dataset(url):
            ds = datasets.load_from_disk(url)
            if isinstance(ds, datasets.DatasetDict):
                names = list(ds)
                name = split or (names[0] if len(names) == 1 else "train")
                if name not in ds:
                    raise JobSpecError(f"input.split: {name!r} is not a split of {url!r}; "
                                       f"expected one of {', '.join(names)}")
                ds = ds[name]
            return ds
        return datasets.load_dataset(url, split=split or "train", streaming=True)
    except JobSpecError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean the same thing here
        raise JobSpecError(f"input.path: cannot load {url!r} as a Hugging Face dataset: {e}") from None


def _hf_num_rows(shard: Shard, split: str | None) -> int | None:
    ds = _open_hf(shard.url, split)
    try:
        return len(ds)
    except TypeError:  # a streamed dataset has no length
        return None
