"""The output directory and its commit protocol: what is committed is exactly what is listed.

    OUT/part-000001-1a2b3c4d.parquet            committed parts: the only files readers see
    OUT/_batchgen/manifest.json                 job fingerprint, output schema, total rows
    OUT/_batchgen/commits/000001-1a2b3c4d.json  one record per commit: the row keys it holds
    OUT/_batchgen/pending/part-....parquet      written, committed or not yet
    OUT/_batchgen/stats.json                    the last run's summary

A commit is three steps: (1) write the part whole under pending/, (2) write its record, (3) move
the part into OUT. Step 2 is the commit point: each step is atomic on its own (store.py), and a
crash between steps is repaired on the next start: a pending part without a record is an
orphan and is deleted (its rows run again), a record whose part is still pending is rolled
forward. Readers of OUT (pyarrow.dataset, datasets) skip `_`-prefixed paths, so they never see an
uncommitted part. One record file per commit (rather than one growing manifest) keeps each
commit a single small put on object stores, where files cannot be appended to.

An OutputDir is handed out by the directory's owner, outdir.JobOutput. It reads the commit records
once (`records()` keeps them, and adds its own commits to them); `records(refresh=True)` reads
them again where other processes have committed meanwhile (data-parallel workers). While a run
holds the directory's lease (lease.py), a commit first checks that the lease was not taken over.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from batchgen.job import store
from batchgen.job.failpoints import failpoint

META_DIR = "_batchgen"
MANIFEST_VERSION = 1
# Summed over commit records as num_<name>: rows written (errors included), error rows, skipped rows, tokens.
COUNTERS = ("rows", "errors", "skipped", "prompt_tokens", "generated_tokens", "cached_tokens")


class RowSet:
    """A set of (shard, row) keys as one bitmap per shard: 10 M rows cost 1.25 MB, not ~1 GB of tuples."""

    def __init__(self) -> None:
        self._bits: dict[int, bytearray] = {}
        self._len = 0

    def add(self, shard: int, row: int) -> None:
        bits = self._bits.setdefault(shard, bytearray())
        byte = row >> 3
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))  # grow geometrically
        mask = 1 << (row & 7)
        if not bits[byte] & mask:
            bits[byte] |= mask
            self._len += 1

    def contains(self, shard: int, row: int) -> bool:
        bits = self._bits.get(shard)
        return bits is not None and (row >> 3) < len(bits) and bool(bits[row >> 3] & (1 << (row & 7)))

    def __contains__(self, key: tuple[int, int]) -> bool:
        return self.contains(*key)

    def __len__(self) -> int:
        return self._len


def encode_keys(keys: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
    """{"shard": [sorted row indices]}: JSON keys must be strings."""
    by_shard: dict[int, list[int]] = {}
    for shard, row in keys:
        by_shard.setdefault(shard, []).append(row)
    return {str(s): sorted(rows) for s, rows in sorted(by_shard.items())}


def decode_keys(encoded: dict[str, list[int]]) -> Iterable[tuple[int, int]]:
    for shard, rows in encoded.items():
        for row in rows:
            yield int(shard), row


class OutputDir:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = store.open_store(url)
        self.meta = store.join(self.root, META_DIR)
        self.commits_dir = store.join(self.meta, "commits")
        self.pending_dir = store.join(self.meta, "pending")
        self._last_seq: int | None = None  # commits are numbered so that names sort in commit order
        self._records: list[dict[str, Any]] | None = None  # read once, then kept up to date by commit()
        self.lease = None  # the lease.Lease a run holds on this directory, checked before each commit

    def path(self, name: str) -> str:
        return store.join(self.root, name)

    # ---- manifest -------------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        return self._read_json(store.join(self.meta, "manifest.json"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = {"version": MANIFEST_VERSION, **manifest}
        store.write_atomic(self.fs, store.join(self.meta, "manifest.json"), json_bytes(manifest))

    def write_stats(self, stats: dict[str, Any]) -> None:
        store.write_atomic(self.fs, store.join(self.meta, "stats.json"), json_bytes(stats))

    def read_stats(self) -> dict[str, Any] | None:
        return self._read_json(store.join(self.meta, "stats.json"))

    def foreign_files(self) -> list[str]:
        """Visible files in OUT that no batchgen commit wrote (OUT should be batchgen's alone)."""
        committed = {r["part"] for r in self.records() if r.get("part")}
        return [n for n in store.list_names(self.fs, self.root)
                if not n.startswith(("_", ".")) and n not in committed]

    # ---- commits --------------------------------------------------------------------------------

    def records(self, refresh: bool = False) -> list[dict[str, Any]]:
        """Every committed record, in commit order: read from the store the first time (or on refresh)."""
        if self._records is None or refresh:
            self._records = list(self.iter_records())
        return self._records

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """The committed records read one at a time (merge: its memory does not grow with the job)."""
        for name in store.list_names(self.fs, self.commits_dir):
            if name.endswith(".json"):
                record = self._read_json(store.join(self.commits_dir, name))
                if record is not None:
                    yield record

    def committed_rows(self, records: list[dict[str, Any]] | None = None) -> RowSet:
        done = RowSet()
        for record in self.records() if records is None else records:
            for key in decode_keys(record["rows"]):
                done.add(*key)
            for key in decode_keys(record.get("skipped", {})):
                done.add(*key)
        return done

    def commit(self, write_part: Callable[[IO[bytes]], None] | None, record: dict[str, Any]) -> str:
        """Commit one part (written by `write_part` into a file object) and its record.

        `write_part` is None for a commit of skipped rows only: their keys are recorded so that a
        resume does not read them again, but there is no part.
        """
        if self.lease is not None:
            self.lease.check()
        if self._last_seq is None:
            self._last_seq = len(store.list_names(self.fs, self.commits_dir))
        self._last_seq += 1
        name = f"{self._last_seq:06d}-{uuid.uuid4().hex[:8]}"  # unique even if two runs raced on one OUT
        part = f"part-{name}.parquet" if write_part is not None else None
        if part:
            with store.atomic_open(self.fs, store.join(self.pending_dir, part)) as f:
                write_part(f)
            failpoint("part_written")
        record = {"name": name, "part": part, "time": time.time(), **record}
        store.write_atomic(self.fs, store.join(self.commits_dir, f"{name}.json"), json_bytes(record))
        if self._records is not None:
            self._records.append(record)
        failpoint("record_written")
        if part:
            store.move(self.fs, store.join(self.pending_dir, part), self.path(part))
            failpoint("part_moved")
        return name

    def recover(self) -> tuple[int, int]:
        """Repair what a crash left between the steps of a commit: (rolled forward, orphans removed)."""
        committed = {r["part"] for r in self.records() if r.get("part")}
        rolled = removed = 0
        for name in store.list_names(self.fs, self.pending_dir):
            src = store.join(self.pending_dir, name)
            if name in committed:
                store.move(self.fs, src, self.path(name))
                rolled += 1
            else:  # an orphan (or a temporary file of an interrupted write): its rows were never committed
                store.remove(self.fs, src)
                removed += 1
        for directory in (self.root, self.meta, self.commits_dir):
            for name in store.list_names(self.fs, directory):
                if name.startswith(".") and ".tmp-" in name:
                    store.remove(self.fs, store.join(directory, name))
                    removed += 1
        missing = sorted(committed - set(store.list_names(self.fs, self.root)))  # one listing, not a HEAD per part
        if missing:
            raise RuntimeError(f"{self.url}: committed part(s) {missing[:3]} are missing (deleted by hand, or by "
                               "an interrupted --force); restore them or start over with --force")
        return rolled, removed

    def reset(self) -> None:
        """Remove this job's output (for --force): the parts it committed, its manifest, records and stats.

        Other files under _batchgen/ (an array's array.json, Slurm logs) stay.
        """
        for record in self.records():
            if record.get("part"):
                store.remove(self.fs, self.path(record["part"]))
        for directory in (self.commits_dir, self.pending_dir):
            if self.fs.exists(directory):
                try:
                    self.fs.rm(directory, recursive=True)
                except FileNotFoundError:
                    pass
        for name in ("manifest.json", "stats.json"):
            store.remove(self.fs, store.join(self.meta, name))
        self._last_seq = None
        self._records = None

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None


def json_bytes(data: dict[str, Any]) -> bytes:
    """Compact JSON for the files under the metadata directory."""
    return json.dumps(data, separators=(",", ":"), sort_keys=False).encode("utf-8")


def job_totals(records: list[dict[str, Any]], total_rows: int | None) -> dict[str, Any]:
    """Counts over every committed record, across all runs of the job."""
    sums = {k: sum(r.get(f"num_{k}", 0) for r in records) for k in COUNTERS}
    done = sums["rows"] + sums["skipped"]
    return {"rows_done": done, "rows_total": total_rows, "complete": total_rows is not None and done >= total_rows,
            "parts": sum(1 for r in records if r.get("part")), **sums}
