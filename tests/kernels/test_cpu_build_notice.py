"""The first-use C++ kernel build is announced once, with where it is cached; a cached build is not."""

from __future__ import annotations

import logging
import os

from kernels import _cpu_build


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
