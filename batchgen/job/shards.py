"""Expand input.path into an ordered list of shards and tell what format each one is.

The shard list is part of the job's fingerprint: row keys are (shard index, row index), so the
same files in the same order must come back on every resume.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import fsspec

from batchgen.job.spec import InputSpec, JobSpecError
from batchgen.job.store import is_local, read_lines

_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".json", ".ndjson")
# Files that mark a directory written by datasets' save_to_disk (a Dataset or a DatasetDict).
_HF_MARKERS = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Shard:
    index: int
    url: str  # what fsspec opens (protocol included for remote stores)
    name: str  # short and stable: generated ids and messages use it (relative to the job file's directory)
    format: str  # parquet | jsonl | openai-batch | hf-dataset
    size: int | None  # bytes, for the fingerprint: a shard that changed size is another input


def resolve_shards(spec: InputSpec) -> list[Shard]:
    """Every file the input names, in order: list order, then sorted within each glob or directory."""
    found: list[tuple[str, str, int | None]] = []
    for pattern in spec.paths:
        if spec.format == "hf-dataset" or (spec.format == "auto" and is_saved_dataset(pattern)):
            found.append((pattern, "hf-dataset", None))
            continue
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        if len(paths) == 1 and fs.isdir(paths[0]):
            paths = [p for p in fs.find(paths[0]) if _known_file(p)]
        elif _has_glob(pattern):
            paths = [p for p in paths if not _hidden(p)]
        if not paths or not (_has_glob(pattern) or fs.exists(paths[0])):
            raise JobSpecError(f"input.path: {pattern!r} matched no files")
        for path in sorted(paths):
            url = path if is_local(fs) else fs.unstrip_protocol(path)
            found.append((url, _file_format(spec.format, url), fs.size(path)))
    seen: set[str] = set()
    shards = []
    for url, fmt, size in found:
        if url in seen:  # a file matched by two patterns is still read once
            continue
        seen.add(url)
        shards.append(Shard(len(shards), url, _short_name(url, spec.base_dir), fmt, size))
    return shards


def _file_format(declared: str, path: str) -> str:
    stem = path.lower()
    for ext in _COMPRESSIONS:
        stem = stem.removesuffix(ext)
    if declared not in ("auto", "jsonl"):
        return declared
    if stem.endswith(_PARQUET) and declared == "auto":
        return "parquet"
    if stem.endswith(_JSONL) or declared == "jsonl":
        # OpenAI batch files are JSONL too: tell them apart by the first object's keys.
        return "openai-batch" if declared == "auto" and _looks_like_openai_batch(path) else "jsonl"
    raise JobSpecError(f"input.path: cannot tell the format of {path!r} from its name; "
                       f"set input.format to one of parquet, jsonl, openai-batch, hf-dataset")


def _looks_like_openai_batch(url: str) -> bool:
    first = next((line for line in read_lines(url, chunk_size=1 << 16) if line.strip()), b"")
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):  # a malformed or too deeply nested first line: a bad row, not a batch file
        return False
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def is_saved_dataset(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return any(fs.exists(posixpath.join(root, marker)) for marker in _HF_MARKERS)


def _hidden(path: str) -> bool:
    # Spark's _SUCCESS, our own _batchgen/, editors' .swp files: what pyarrow.dataset skips, we skip.
    return posixpath.basename(path).startswith((".", "_"))


def _known_file(path: str) -> bool:
    if _hidden(path):
        return False
    stem = posixpath.basename(path).lower()
    for ext in _COMPRESSIONS:
        stem = stem.removesuffix(ext)
    return stem.endswith(_PARQUET + _JSONL)


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _short_name(url: str, base_dir: str) -> str:
    if "://" not in url and os.path.isabs(url):
        rel = os.path.relpath(url, base_dir)
        return url if rel.startswith("..") else rel
    return url
