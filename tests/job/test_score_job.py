"""task: score through the CLI on the embedded model: completion logprobs, their sum, mean and
perplexity equal log_softmax of HF's forward over prompt + completion (fp32), also with small chunks."""

from __future__ import annotations

import math

import pyarrow.dataset as ds
import pytest
import torch

from batchgen.job.spec import JobSpec, JobSpecError
from tests.job.conftest import run_cli, write_job, write_jsonl

ROWS = [
    {"id": "a", "prompt": "The capital of France is", "completion": " Paris."},
    {"id": "b", "prompt": "2 + 2 =", "completion": " 4, and 3 + 3 = 6."},
    {"id": "c", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    {"id": "d", "messages": [{"role": "user", "content": "no answer"}]},  # not scorable: its error
]


def _expected(tokenizer, row, model):
    if "messages" in row:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(row["prompt"])["input_ids"]
        c_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    ids = p_ids + c_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    values = [lp[j - 1, ids[j]].item() for j in range(len(p_ids), len(ids))]
    top = [lp[j - 1].topk(2) for j in range(len(p_ids), len(ids))]
    return values, top


@pytest.mark.parametrize("budget", [7])
def test_score_job_matches_hf_forward(budget, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from batchgen.models.loader import resolve_model

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    engine = {"max_model_len": 256, "num_kv_blocks": 64}
    if budget:
        engine["max_num_batched_tokens"] = budget  # many chunks per row
    job = write_job(tmp_path / "job.yaml", task="score", model={"path": "smollm2-135m", "dtype": "float32"},
                    input={"path": str(data)}, output={"path": str(tmp_path / "out")}, score={"top_logprobs": 2},
                    engine=engine)
    result = run_cli("run", str(job), timeout=900)  # a loaded shared machine is slow
    assert result.returncode == 0, result.stderr
    rows = {r["id"]: r for r in ds.dataset(tmp_path / "out").to_table().to_pylist()}
    assert "assistant" in rows["d"]["error"]
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32).eval()
    for row in ROWS[:3]:
        got = rows[row["id"]]
        assert got["error"] is None and got["num_generated_tokens"] == 0
        values, top = _expected(tokenizer, row, hf)
        assert got["num_completion_tokens"] == len(values)
        assert got["completion_logprobs"] == pytest.approx(values, abs=1e-4)
        assert got["sum_logprob"] == pytest.approx(math.fsum(values), abs=1e-3)
        assert got["mean_logprob"] == pytest.approx(math.fsum(values) / len(values), abs=1e-4)
        assert got["perplexity"] == pytest.approx(math.exp(-got["mean_logprob"]), rel=1e-9)
        for entries, t in zip(got["top_logprobs"], top):
            assert [e["token_id"] for e in entries] == t.indices.tolist()
            assert [e["logprob"] for e in entries] == pytest.approx(t.values.tolist(), abs=1e-4)


def test_score_section_is_validated(tmp_path):
    base = {"input": {"path": str(tmp_path / "x.jsonl")}, "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(JobSpecError, match="score.top_logprobs"):
        JobSpec.from_dict({**base, "task": "score", "score": {"top_logprobs": -1}})
    with pytest.raises(JobSpecError, match="only allowed with task: score"):
        JobSpec.from_dict({**base, "score": {}})
    with pytest.raises(JobSpecError, match="task"):
        JobSpec.from_dict({**base, "task": "embed"})
