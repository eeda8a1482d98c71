"""Shared helpers for the job-layer tests: input files, job files, the real tokenizer and engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_random_model

REPO = Path(__file__).resolve().parents[2]

# Deterministic engine settings for tests that compare two runs token for token: one row at a time
# in float32 and no prefix cache, so a row's tokens cannot depend on which rows ran beside it.
DETERMINISTIC_ENGINE = {"max_model_len": 256, "max_num_seqs": 1, "enable_prefix_caching": False,
                        "num_kv_blocks": 64}
SMALL_ENGINE = {"max_model_len": 256, "max_num_seqs": 8, "num_kv_blocks": 256}


def write_jsonl(path: Path, rows: list) -> Path:
    """rows: dicts are JSON-encoded, bytes are written as the raw line (for malformed-input tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return path


def write_job(path: Path, **sections) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run `python -m batchgen ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "batchgen", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO, check=False)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def tokenizer():
    from batchgen.models.loader import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def engine():
    """One real engine for the in-process runner tests (loading it costs a few seconds)."""
    from batchgen.config import EngineConfig
    from batchgen.engine import Engine

    return Engine(EngineConfig(model="smollm2-135m", dtype="float32", **SMALL_ENGINE))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir):
    """A 2-layer Llama with SmolLM2's vocabulary, so that text prompts tokenize into it."""
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return save_random_model(config, AutoTokenizer.from_pretrained(smol_dir), tmp_path_factory.mktemp("tiny-vocab"))
