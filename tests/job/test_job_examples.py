"""The shipped job files and the dataset pipeline example run as documented (with fewer tokens)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.dataset as pads
import pytest

from tests.job.conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # the embedded model


@pytest.mark.parametrize("job, rows", [("jobs/demo.yaml", 16), ("jobs/openai-batch.yaml", 5),
                                       ("jobs/chat-dataset.yaml", 24), ("jobs/structured.yaml", 4),
                                       ("jobs/scoring.yaml", 4)])
def test_shipped_jobs_run(tmp_path, job, rows):
    out = tmp_path / "out"
    result = run_cli("run", "-q", job, "--set", "sampling.max_tokens=4", "--set", f"output.path={out}")
    assert result.returncode == 0, result.stderr
    table = pads.dataset(str(out)).to_table()
    assert table.num_rows == rows and table["error"].null_count == rows


def test_dataset_pipeline_example(tmp_path):
    result = subprocess.run([sys.executable, "examples/generate_dataset.py", "--rows", "6", "--max-tokens", "4",
                             "--out", str(tmp_path), "--quiet"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert "SFT dataset:" in result.stdout and "(6 conversations)" in result.stdout
    import datasets

    sft = datasets.load_from_disk(str(tmp_path / "sft"))
    assert sft.num_rows == 6 and [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
