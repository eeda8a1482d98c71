"""Reasoning models: chat_template_kwargs (LLM.chat, job-wide, per row), the reasoning/answer split,
thinking_token_budget, thinking off.

A tiny random Qwen3 with the embedded model's tokenizer plus <think> and </think> as added special
tokens, and a chat template that reads enable_thinking: on (the default), it opens the block in
the generation prompt as DeepSeek-R1's does; off, it opens and closes it as Qwen3's does.
"""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from batchgen import LLM, SamplingParams
from batchgen.reasoning import Markers, parse_reasoning, split_ids
from tests.conftest import TINY, save_random_model

TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}")
CHAT = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def qwen3_thinking(tmp_path_factory, smol_dir):
    from transformers import AutoTokenizer, Qwen3Config

    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.add_tokens(["<think>", "</think>"], special_tokens=True)
    tok.chat_template = TEMPLATE
    config = Qwen3Config(**{**TINY, "vocab_size": len(tok)}, head_dim=32, tie_word_embeddings=False)
    return save_random_model(config, tok, tmp_path_factory.mktemp("tiny-qwen3-thinking"))


@pytest.fixture(scope="module")
def llm(qwen3_thinking):
    return LLM(qwen3_thinking, dtype="float32", device="cpu", num_kv_blocks=64, reasoning_parser="qwen3")


def _params(**kw):
    return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw)


def test_block_opened_by_the_template_is_split_off(llm):
    tok = llm.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    out = llm.chat(CHAT, _params(), use_tqdm=False)[0]
    assert out.prompt.endswith("<think>\n")
    c = out.outputs[0]
    assert end not in c.token_ids  # a random model never closes it: everything is reasoning
    assert c.finish_reason == "length" and c.text == ""
    assert c.reasoning_text == tok.decode(c.token_ids, skip_special_tokens=True).strip() != ""


def test_thinking_token_budget_closes_the_block(llm):
    tok = llm.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    free = llm.chat(CHAT, _params(), use_tqdm=False)[0].outputs[0].token_ids
    out = llm.chat(CHAT, _params(thinking_token_budget=4), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids[:4] == free[:4] and c.token_ids[4] == end  # forced after 4 reasoning tokens
    assert len(c.token_ids) == 12 and c.finish_reason == "length"  # the answer continues within max_tokens
    assert c.reasoning_text == tok.decode(c.token_ids[:4], skip_special_tokens=True).strip()
    assert c.text == tok.decode(c.token_ids[5:], skip_special_tokens=True).strip()
    # The answer is what the model says after the forced marker: greedy from that context.
    prompt_ids = out.prompt_token_ids + c.token_ids[:5]
    again = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert again == c.token_ids[5:]
    stats = llm.stats()
    assert stats["reasoning_tokens"] > 0 and stats["answer_tokens"] > 0


def test_budget_zero_closes_at_once(llm):
    end = llm.tokenizer.convert_tokens_to_ids("</think>")
    c = llm.chat(CHAT, _params(thinking_token_budget=0), use_tqdm=False)[0].outputs[0]
    assert c.token_ids[0] == end and c.reasoning_text == ""


def test_thinking_off_gives_empty_reasoning(llm):
    tok = llm.tokenizer
    out = llm.chat(CHAT, _params(), use_tqdm=False, chat_template_kwargs={"enable_thinking": False})[0]
    assert out.prompt.endswith("<think>\n\n</think>\n\n")
    c = out.outputs[0]
    assert c.reasoning_text == ""
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True).strip()


def test_split_with_a_generated_start_marker():
    m = Markers((10,), (11, 12))
    prompt = [1, 2, 3]
    assert split_ids(prompt, [5, 10, 6, 7, 11, 12, 8], m).__dict__ == dict(reasoning_ids=[6, 7], answer_ids=[5, 8],
                                                                            closed=True)
    assert split_ids(prompt, [10, 6, 7], m).__dict__ == dict(reasoning_ids=[6, 7], answer_ids=[], closed=False)
    assert split_ids(prompt, [6, 7], m).__dict__ == dict(reasoning_ids=[], answer_ids=[6, 7], closed=True)
    assert split_ids([1, 10, 4], [6, 11, 12, 7], m).reasoning_ids == [6]  # opened by the prompt
    assert split_ids([1, 10, 11, 12], [6, 7], m).__dict__ == dict(reasoning_ids=[], answer_ids=[6, 7], closed=True)


def test_generated_start_marker_in_the_engine(qwen3_thinking):
    """Markers the model really generates (two of its own greedy tokens): the split of real output."""
    plain = LLM(qwen3_thinking, dtype="float32", device="cpu", num_kv_blocks=64)
    tok = plain.tokenizer
    prompt = tok.encode("Hello there, how are")
    ids = plain.generate([prompt], _params(), use_tqdm=False)[0].outputs[0].token_ids
    start, end = tok.decode(ids[2:3]), tok.decode(ids[6:7])
    m = Markers.of(tok, start, end)
    if m.start != tuple(ids[2:3]) or m.end != tuple(ids[6:7]) or start in tok.decode(ids[:2]):
        pytest.skip("these tokens do not round-trip through the tokenizer")
    marked = LLM(qwen3_thinking, dtype="float32", device="cpu", num_kv_blocks=64,
                 reasoning_parser={"start": start, "end": end})
    c = marked.generate([prompt], _params(), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == ids
    assert c.reasoning_text == tok.decode(ids[3:6]).strip()
    assert c.text == tok.decode(ids[:2] + ids[7:]).strip()


def test_reasoning_parser_is_validated():
    assert parse_reasoning("deepseek_r1") == ("<think>", "</think>")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        parse_reasoning("gpt-oss-x")
    with pytest.raises(ValueError, match="different"):
        parse_reasoning({"start": "<t>", "end": "<t>"})


def test_budget_without_markers_is_a_row_error(qwen3_thinking):
    plain = LLM(qwen3_thinking, dtype="float32", device="cpu", num_kv_blocks=16)
    out = plain.generate([[5, 6]], _params(thinking_token_budget=3), use_tqdm=False)[0]
    assert "reasoning_parser" in out.error


def test_job_reasoning_columns_job_wide_and_per_row(tmp_path, qwen3_thinking):
    from batchgen.job.runner import run_job
    from tests.job.conftest import write_jsonl

    rows = [{"id": "on", "messages": CHAT, "thinking_token_budget": 3},
            {"id": "off", "messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}},
            {"id": "default", "messages": CHAT},
            {"id": "back_on", "messages": CHAT, "chat_template_kwargs": {"enable_thinking": True},
             "thinking_token_budget": 3}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = {"model": {"path": qwen3_thinking, "dtype": "float32"}, "input": {"path": str(data)},
           "output": {"path": str(tmp_path / "out"), "reasoning": "qwen3"},
           "sampling": {"temperature": 0, "max_tokens": 10, "ignore_eos": True},
           "engine": {"num_kv_blocks": 64, "device": "cpu"}}
    result = run_job(job, quiet=True)
    got = {r["id"]: r for r in ds.dataset(tmp_path / "out").to_table().to_pylist()}
    assert all(r["error"] is None for r in got.values())
    assert got["off"]["reasoning_text"] == "" and got["off"]["generated_text"] != ""
    assert got["default"]["generated_text"] == "" and got["default"]["reasoning_text"] != ""  # never closed
    assert got["on"]["generated_text"] != "" and got["on"]["num_generated_tokens"] == 10  # closed by the budget
    assert (got["back_on"]["reasoning_text"], got["back_on"]["generated_text"]) == \
        (got["on"]["reasoning_text"], got["on"]["generated_text"])
    run = result.stats["run"]
    assert run["reasoning_tokens"] + run["answer_tokens"] == run["generated_tokens"]

    # Job-wide thinking off, with the row's column merged over it (the row turns it back on).
    job["input"]["chat_template_kwargs"] = {"enable_thinking": False}
    job["output"]["path"] = str(tmp_path / "out2")
    run_job(job, quiet=True)
    got2 = {r["id"]: r for r in ds.dataset(tmp_path / "out2").to_table().to_pylist()}
    assert got2["default"]["reasoning_text"] == "" and got2["off"]["reasoning_text"] == ""
    assert got2["default"]["generated_text"] == got["off"]["generated_text"]  # same prompt as the row's "off"
    assert got2["back_on"]["generated_text"] == got["on"]["generated_text"]  # the row's kwargs win
