"""`make gpu-check` without CUDA: it says what it would run, exits 0 and writes no figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import BEGIN, END, STEPS, write_section

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here: gpu-check would run")
def test_without_cuda_prints_the_plan_and_claims_nothing(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nexisting tables\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--doc", str(doc)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    for name, _, _ in STEPS:
        assert name in proc.stdout
    assert doc.read_text() == "# Performance\n\nexisting tables\n"  # nothing claimed


def test_section_is_replaced_not_appended_twice(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nintro\n")
    write_section(doc, f"{BEGIN}\nfirst\n{END}\n")
    write_section(doc, f"{BEGIN}\nsecond\n{END}\n")
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text and text.startswith("# Performance")
