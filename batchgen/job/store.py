"""File operations over fsspec: atomic writes, and line reading through any compression.

A reader must never see half a file: on a local disk a file is written under a hidden temporary
name (pyarrow.dataset and glob patterns skip names starting with '.'), flushed, fsynced and
renamed; on an object store (s3://, gs://, memory://) one upload is already atomic.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def open_store(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without protocol) for a local path or any fsspec URL."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open `path` for writing so that it appears whole or not at all."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if not is_local(fs):
        # The object is created on close by a single put; an exception before that uploads nothing.
        with fs.open(path, "wb") as f:
            yield f
        return
    tmp = join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(posixpath.dirname(path))


def read_lines(url: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a file (without b"\n"), decompressed by its suffix (.gz, .zst, ...).

    Reads fixed-size blocks rather than trusting readline: some decompressors (zstandard) do not
    implement it, and memory stays bounded by the longest line.
    """
    with fsspec.open(url, "rb", compression="infer") as f:
        pending = b""
        while block := f.read(chunk_size):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            yield from lines
        if pending:
            yield pending


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def move(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Rename on a local disk (atomic); copy-then-delete on object stores (the copy is one put)."""
    if is_local(fs):
        os.replace(src, dst)
        _fsync_dir(posixpath.dirname(dst))
    else:
        fs.mv(src, dst)


def list_names(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """Base names of the files in a directory; empty when it does not exist."""
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def _fsync_dir(directory: str) -> None:
    # Make the rename itself durable; without it a power cut can forget a committed file.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
