"""The vLLM CPU bench peer: where vLLM cannot run, its rows are a skip note, not a failure."""

from __future__ import annotations

import os
import stat

from benchmarks import vllm_peer
from benchmarks.workloads import w3s_short_outputs


def test_a_broken_vllm_venv_gives_a_skip_note(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    venv = tmp_path / "vllm-cpu-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named vllm' >&2\nexit 1\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    r = vllm_peer.run_vllm("/nonexistent-model", "bfloat16", w3s_short_outputs(4))
    assert set(r) == {"skipped"} and "No module named vllm" in r["skipped"]


def test_preloads_and_a_clean_environment(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").touch()
    env = vllm_peer.preload_env(tmp_path)
    assert str(tmp_path / "lib" / "libiomp5.so") in env["LD_PRELOAD"].split(":")
    assert "PYTHONPATH" not in env
    tcmalloc = [p for p in vllm_peer.TCMALLOC if os.path.exists(p)]
    if tcmalloc:
        assert env["LD_PRELOAD"].split(":")[0] == tcmalloc[0]


def test_w3s_rows_share_a_few_long_prefixes():
    wl = w3s_short_outputs(64)
    assert len({tuple(p[:320]) for p in wl.prompts}) == 4 and min(map(len, wl.prompts)) >= 256 + 4
    assert w3s_short_outputs(256).prompts[0][:320] in [p[:320] for p in wl.prompts]  # the same prefixes
    assert wl.optimal_hit_rate() > 0.9
