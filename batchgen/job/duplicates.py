"""Find the rows whose id an earlier row already has, over a whole input, in bounded memory.

One pass keeps an 8-byte hash per row (10 M rows: 80 MB of hashes, 80 MB of positions), sorts
them and looks for equal neighbours. Only when some hash repeats does a second pass read the ids of
those few rows to tell true duplicates from hash collisions, so the answer is exact.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator

import numpy as np

IdSource = Callable[[], Iterator[tuple[int, int, str]]]  # a fresh pass of (shard, row, id) in input order


def find_duplicates(ids: IdSource) -> dict[tuple[int, int], tuple[int, int]]:
    """{(shard, row) of every later row with an id: (shard, row) of the first row with that id}."""
    hashes = array("Q")
    for _, _, row_id in ids():
        hashes.append(_hash(row_id))
    if len(hashes) < 2:
        return {}
    h = np.frombuffer(hashes, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    sorted_h = h[order]
    same = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
    if not same.size:
        return {}
    candidates = set(order[same].tolist()) | set(order[same + 1].tolist())  # positions in input order
    del hashes, h, order, sorted_h
    first: dict[str, tuple[int, int]] = {}
    duplicates: dict[tuple[int, int], tuple[int, int]] = {}
    for position, (shard, row, row_id) in enumerate(ids()):
        if position in candidates:
            if row_id in first:
                duplicates[(shard, row)] = first[row_id]
            else:
                first[row_id] = (shard, row)
    return duplicates


def _hash(row_id: str) -> int:
    data = row_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
