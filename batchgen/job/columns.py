"""How kept columns of untyped inputs (JSONL, OpenAI batch files) are stored: losslessly, one way per job.

JSON declares no column types and scraped JSONL changes them from row to row: a list in most rows, a
string in one, null in another; 7 then true; integers beyond int64; NaN; columns that first appear
on line 900 000. The storage of each kept column is decided once, before the first part is written,
from every row of the input (ColumnProfile sees them all), and it never changes afterwards, so every
part of OUT has one schema and reads as one dataset (pyarrow.dataset, datasets, `batchgen merge`):

    every non-null value a string         -> string
    every non-null value true/false        -> bool
    every non-null value an int in int64   -> int64
    numbers (ints exact in a double too)   -> float64 (NaN and infinities included)
    anything else: lists, objects, mixed kinds, ints beyond int64, strings that are not valid
    Unicode (lone surrogates)              -> JSON text: a string column holding json.dumps(value)

A JSON-text column carries the field metadata {"batchgen.storage": "json"}; json.loads of a cell gives
the row's value back exactly (decode_json_columns does it for a table). Null and a missing key are both
null in every storage.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

STORAGE_KEY = b"batchgen.storage"
JSON_STORAGE = b"json"
SOURCE_KEY = b"batchgen.key"  # on a column whose JSON key is not valid Unicode: that key, as escaped JSON
_INT64 = (-(1 << 63), (1 << 63) - 1)
_EXACT_IN_DOUBLE = 1 << 53


def kind_of(value: Any) -> str:
    """The JSON kind of a value, with the distinctions storage cares about."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else "big int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string" if _is_utf8(value) else "string (invalid Unicode)"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (json.loads accepts "\ud800")
        return False
    return True


@dataclass
class ColumnProfile:
    """The kinds of values every column holds, over all rows seen; names in first-seen order."""

    kinds: dict[str, Counter] = field(default_factory=dict)
    inexact_ints: set[str] = field(default_factory=set)  # columns with an int a double cannot hold exactly

    def add(self, data: dict[str, Any], columns: set[str] | None = None) -> None:
        for name, value in data.items():
            if columns is not None and name not in columns:
                continue
            kind = kind_of(value)
            counts = self.kinds.get(name)
            if counts is None:
                counts = self.kinds[name] = Counter()
            counts[kind] += 1
            if kind == "int" and not -_EXACT_IN_DOUBLE <= value <= _EXACT_IN_DOUBLE:
                self.inexact_ints.add(name)

    def field(self, name: str) -> pa.Field:
        counts = self.kinds.get(name, Counter())
        kinds = set(counts) - {"null"}
        if not kinds or kinds == {"string"}:
            return column_field(name, pa.string())  # all null: text is the likeliest
        if kinds == {"bool"}:
            return column_field(name, pa.bool_())
        if kinds == {"int"}:
            return column_field(name, pa.int64())
        if kinds <= {"int", "float"} and name not in self.inexact_ints:
            return column_field(name, pa.float64())
        return json_field(name)

    def schema(self) -> pa.Schema:
        return pa.schema([self.field(n) for n in self.kinds])

    def describe(self, name: str) -> str:
        """The kinds a column holds, most common first: 'list in 98 rows, string in 1, null in 1'."""
        counts = self.kinds.get(name, Counter())
        parts = [f"{kind} in {n} row{'s' if n != 1 else ''}" for kind, n in counts.most_common()]
        return ", ".join(parts) or "never present"


def json_field(name: str) -> pa.Field:
    return column_field(name, pa.string(), {STORAGE_KEY: JSON_STORAGE})


def column_field(name: str, typ: pa.DataType, metadata: dict[bytes, bytes] | None = None) -> pa.Field:
    """A field for input key `name`; a key that is not valid Unicode (a lone surrogate) cannot name an
    Arrow or Parquet column, so it is written with \\u escapes and the key kept in the metadata."""
    metadata = dict(metadata or {})
    if not _is_utf8(name):
        metadata[SOURCE_KEY] = json.dumps(name).encode("ascii")
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return pa.field(name, typ, metadata=metadata or None)


def source_key(f: pa.Field) -> str:
    """The input key a kept column's values come from."""
    return json.loads(f.metadata[SOURCE_KEY]) if f.metadata and SOURCE_KEY in f.metadata else f.name


def is_json_field(f: pa.Field) -> bool:
    return bool(f.metadata) and f.metadata.get(STORAGE_KEY) == JSON_STORAGE


def storage_name(f: pa.Field) -> str:
    """How a kept column is stored, in words for validate and stats.json."""
    return "JSON text" if is_json_field(f) else str(f.type)


def to_json_text(value: Any) -> str | None:
    """json.dumps(value), readable back by json.loads; None stays null.

    NaN and infinities are written as Python's json writes them (NaN, Infinity), which json.loads
    reads. A string with a lone surrogate cannot be UTF-8, so such values are written with \\u escapes.
    """
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if _is_utf8(text) else json.dumps(value, ensure_ascii=True, default=str)


def decode_json_columns(table: pa.Table) -> list[dict[str, Any]]:
    """The table's rows as Python dicts, JSON-text columns parsed back into their values."""
    rows = table.to_pylist()
    for f in table.schema:
        if is_json_field(f):
            for row in rows:
                if row[f.name] is not None:
                    row[f.name] = json.loads(row[f.name])
    return rows


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value (7 == 7.0, NaN == NaN), bools only equal bools."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
