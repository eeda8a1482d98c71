"""Engine features through the job layer, on a tiny random Llama with the embedded model's tokenizer:
per-row LoRA adapters, speculative decoding statistics, and the data-parallel process fan-out."""

from __future__ import annotations

import json
import signal

import pyarrow.dataset as pads
import pytest
import torch

from batchgen.job.manifest import OutputDir
from batchgen.job.reader import RowShare
from batchgen.job.runner import run_job
from tests.job.conftest import REPO, run_cli, write_job, write_jsonl

pytestmark = pytest.mark.slow  # models (tiny ones), worker processes

ONE_AT_A_TIME = {"device": "cpu", "max_model_len": 128, "max_num_seqs": 1, "enable_prefix_caching": False,
                 "num_kv_blocks": 32}


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("adapters")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False), adapter_name="sql")
    peft_model.add_adapter("poem", LoraConfig(r=8, lora_alpha=8, target_modules=["o_proj", "down_proj"],
                                              init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    return out


def rows_by_id(url: str) -> dict[str, dict]:
    return {r["id"]: r for r in pads.dataset(url).to_table().to_pylist()}


def test_lora_rows_run_with_their_adapter_grouped_so_swaps_are_rare(tiny_dir, adapters, tmp_path):
    from batchgen import LLM, SamplingParams

    prompts = ["The sea is", "Cats like", "Rain falls", "Dogs run"]
    names = ["sql", "poem", None, "", "poem", "sql", "poem", "sql", "nope"]
    rows = [{"id": f"r{i}", "prompt": prompts[i % 4], "lora": name} for i, name in enumerate(names)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    # Adapter paths are relative to the job file; one device slot: every adapter change is a load.
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out"},
                    sampling={"max_tokens": 5, "temperature": 0.0, "ignore_eos": True},
                    engine=ONE_AT_A_TIME,
                    lora={"adapters": {"sql": f"{adapters.name}/sql", "poem": f"{adapters.name}/poem"},
                          "max_loras": 1})
    (tmp_path / adapters.name).symlink_to(adapters)
    result = run_job(str(job), quiet=True)
    assert result.complete
    by_id = rows_by_id(str(tmp_path / "out"))
    assert by_id["r8"]["error"] == "unknown LoRA adapter 'nope' in column 'lora'; the job's lora.adapters are 'sql', 'poem'"
    # Rows sorted by (adapter, prompt): base, then poem, then sql: each adapter loaded once.
    assert result.stats["run"]["engine"]["lora_loads"] == 2

    llm = LLM(model=tiny_dir, dtype="float32", lora_adapters={"sql": str(adapters / "sql"),
                                                             "poem": str(adapters / "poem")}, **ONE_AT_A_TIME)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(names[:-1]):
        expected = llm.generate([prompts[i % 4]], params, use_tqdm=False, lora=name or None)[0].outputs[0].text
        assert by_id[f"r{i}"]["generated_text"] == expected, (i, name)
    # The adapters matter: the same prompt gives three different continuations.
    assert len({by_id[k]["generated_text"] for k in ("r0", "r2", "r4")}) == 3  # "The sea is": sql, base, poem


def test_speculative_section_reports_acceptance_in_stats_and_summary(tiny_dir, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": "one two three one two three one two"}
                                          for i in range(3)])
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out"},
                    sampling={"max_tokens": 12, "temperature": 0.0, "ignore_eos": True},
                    engine={"device": "cpu", "max_model_len": 128, "num_kv_blocks": 64},
                    speculative={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    result = run_cli("run", str(job))
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "_batchgen" / "stats.json").read_text())
    run = stats["run"]
    assert 0.0 <= run["spec_acceptance_rate"] <= 1.0 and run["engine"]["spec_proposed_tokens"] > 0
    assert len(run["spec_acceptance_per_position"]) == 3 and run["spec_mean_accepted_length"] >= 1.0
    assert "speculative acceptance" in result.stderr
    engine = run["engine"]
    assert run["spec_acceptance_rate"] == pytest.approx(engine["spec_accepted_tokens"] / engine["spec_proposed_tokens"])
    assert f"speculative acceptance {run['spec_acceptance_rate']:.1%}" in result.stderr


def test_data_parallel_workers_take_disjoint_sub_shares_and_a_resume_may_use_fewer(tiny_dir, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Item {i}:"} for i in range(16)])
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out", "commit_every_rows": 1},
                    sampling={"max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
                    engine=ONE_AT_A_TIME)
    task_dir = tmp_path / "out" / "task-00001"
    share = RowShare(1, 2)  # task 1 of 2: 8 rows; two workers take half of them each

    # Both workers are SIGKILLed at their 10th engine step and may not be restarted: the task fails,
    # naming the worker and how it died; some rows are committed.
    crashed = run_cli("run", str(job), "--task-index", "1", "--num-tasks", "2", "--data-parallel", "2",
                      "--set", "sharding.max_worker_restarts=0", env={"BATCHGEN_FAILPOINTS": "engine_step=10"})
    assert crashed.returncode == 1, crashed.stderr
    assert "data-parallel worker" in crashed.stderr and "was killed by SIGKILL" in crashed.stderr
    assert "0 restart(s) allowed (sharding.max_worker_restarts)" in crashed.stderr
    records = OutputDir(str(task_dir)).records()
    assert {r["worker"] for r in records} == {0, 1}
    for r in records:
        sub = RowShare(share.index + share.count * r["worker"], share.count * 2)
        assert all(sub.takes(0, row) for row in r["rows"]["0"])  # each worker wrote only its sub-share
    first = sum(r["num_rows"] for r in records)
    assert 0 < first < 8

    # Resumed by one process (a requeue onto a node with one GPU): the rest of the task, exactly once.
    done = run_cli("run", str(job), "--task-index", "1", "--num-tasks", "2", "--data-parallel", "1")
    assert done.returncode == 0, done.stderr
    stats = json.loads((task_dir / "_batchgen" / "stats.json").read_text())
    assert stats["run"]["rows"] == 8 - first and stats["job"]["complete"]
    keys = sorted((r["_shard_index"], r["_row_index"]) for r in rows_by_id(str(task_dir)).values())
    assert keys == [(0, i) for i in range(16) if share.takes(0, i)]  # every row of the task exactly once


def test_a_killed_data_parallel_worker_is_restarted_and_the_job_ends_exactly_once(tiny_dir, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Item {i}:"} for i in range(16)])
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out", "commit_every_rows": 1},
                    sampling={"max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
                    engine=ONE_AT_A_TIME)
    # One worker (whichever gets there first) is SIGKILLed, as by the OOM killer, once, right after
    # its 3rd commit record is written and before that part is moved into OUT: the restarted worker
    # must count that commit as done, and the parent completes it when the workers have ended.
    done = run_cli("run", str(job), "--data-parallel", "2",
                   env={"BATCHGEN_FAILPOINTS": "record_written=3", "BATCHGEN_FAILPOINTS_ONCE": str(tmp_path / "killed")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "killed").exists()
    assert "was killed by SIGKILL" in done.stderr and "restarting it (1 of at most 3)" in done.stderr
    stats = json.loads((tmp_path / "out" / "_batchgen" / "stats.json").read_text())
    assert stats["job"]["complete"] and stats["job"]["rows"] == 16 and stats["run"]["worker_restarts"] == 1
    records = OutputDir(str(tmp_path / "out")).records()
    assert {r["worker"] for r in records} == {0, 1}
    table = pads.dataset(str(tmp_path / "out")).to_table()  # every part: a row written twice would show
    keys = sorted(zip(table["_shard_index"].to_pylist(), table["_row_index"].to_pylist()))
    assert keys == [(0, i) for i in range(16)]  # every row exactly once
    assert not list((tmp_path / "out" / "_batchgen" / "pending").glob("*"))
    assert not (tmp_path / "out" / "_batchgen" / "lease.json").exists()


def test_data_parallel_forwards_sigterm_to_its_workers(tiny_dir, tmp_path):
    import subprocess
    import sys
    import time


    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Item {i}:"} for i in range(40)])
    job = write_job(tmp_path / "job.yaml", model={"path": tiny_dir, "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out", "commit_every_rows": 1},
                    sampling={"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}, engine=ONE_AT_A_TIME)
    proc = subprocess.Popen([sys.executable, "-m", "batchgen", "run", "-q", str(job), "--data-parallel", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    commits = tmp_path / "out" / "_batchgen" / "commits"
    deadline = time.monotonic() + 120

    def workers_committed() -> set[int]:
        found = set()
        for path in commits.glob("*.json"):
            try:
                found.add(json.loads(path.read_text())["worker"])
            except (ValueError, KeyError, OSError):
                pass
        return found

    while workers_committed() != {0, 1} and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    stats = json.loads((tmp_path / "out" / "_batchgen" / "stats.json").read_text())
    assert stats["interrupted"] == "SIGTERM" and 0 < stats["job"]["rows_done"] < 40
    run = stats["run"]  # both workers' numbers, summed
    assert run["data_parallel"] == 2 and len(run["engine"]["workers"]) == 2
    assert run["rows"] == stats["job"]["rows_done"] and run["generated_tokens"] == 16 * run["rows"]
    assert all(w["requests_finished"] > 0 for w in run["engine"]["workers"])
    assert not list((tmp_path / "out" / "_batchgen" / "pending").glob("*"))
    assert len(rows_by_id(str(tmp_path / "out"))) == stats["job"]["rows_done"]
