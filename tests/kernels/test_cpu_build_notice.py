"""The first-use C++ kernel build is announced once, with where it is cached; a cached build is not."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from batchgen.kernels import _cpu_build

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_first_build_is_announced_once_with_its_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "_announced", False)
    with caplog.at_level(logging.INFO, logger="batchgen"):
        assert _cpu_build._announce("batchgen_a")  # nothing built yet: it compiles
        assert _cpu_build._announce("batchgen_b")  # compiles too, but is not announced again
    notices = [r.getMessage() for r in caplog.records if "compiling" in r.getMessage()]
    assert len(notices) == 1 and str(tmp_path) in notices[0] and "kernels.build" in notices[0]

    os.makedirs(tmp_path / "batchgen_c")
    (tmp_path / "batchgen_c" / "batchgen_c.so").write_bytes(b"")
    assert not _cpu_build._announce("batchgen_c")  # cached: torch loads it without compiling


def test_a_build_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path):
    """torch's `lock` file outlives a builder that was killed; the next build must not wait on it forever."""
    name = "batchgen_stale_lock_probe"
    (tmp_path / name).mkdir()
    (tmp_path / name / "lock").write_bytes(b"")  # what a SIGKILLed build leaves behind
    probe = (
        "from batchgen.kernels import _cpu_build\n"
        f"m = _cpu_build.build({name!r}, '#include <torch/extension.h>\\nint64_t twice(int64_t x) {{ return 2 * x; }}', ['twice'])\n"
        "assert m is not None and m.twice(21) == 42\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "BATCHGEN_CPU_KERNELS": "1"}
    try:
        subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("the build waited on a stale lock file")
    assert not (tmp_path / name / "lock").exists()
