"""Reading a 1M-row Parquet file stays in bounded memory.

Measured in a fresh child process with resource.getrusage (ru_maxrss: peak resident set, KiB on
Linux): the peak after reading the whole file may exceed the peak after its first 20k rows by
less than 64 MiB, while the file's column data alone is ~150 MB in Arrow and several times that
as Python rows. Reading it whole would blow the bound many times over.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = 1_000_000
BOUND_MIB = 64

CHILD = """
import json, resource, sys
from batchgen.job.reader import Reader
from batchgen.job.shards import resolve_shards
from batchgen.job.spec import InputSpec

spec = InputSpec(paths=(sys.argv[1],))
rows = iter(Reader(resolve_shards(spec), spec))
n = 0
for row in rows:  # warm up: imports, allocator pools and the first row groups are in the baseline
    n += 1
    if n == 20_000:
        break
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
last = None
for last in rows:
    n += 1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": n, "last": last.prompt[:12], "growth_kib": peak - base}))
"""


def test_million_row_parquet_reads_in_bounded_memory(tmp_path):
    filler = "x" * 120
    table = pa.table({"id": pa.array(range(ROWS)), "prompt": pa.array([f"row {i:07d} {filler}" for i in range(ROWS)])})
    assert table.nbytes > 120 * 2**20
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=10_000)
    del table

    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big.parquet")],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    assert result["rows"] == ROWS and result["last"] == "row 0999999 "
    assert result["growth_kib"] < BOUND_MIB * 1024, result
