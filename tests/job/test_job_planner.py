"""Planning with the model's real tokenizer: rendering, per-row sampling, bad rows, prefix order."""

from __future__ import annotations

import pytest

from batchgen.job.planner import Planner
from batchgen.job.reader import Row
from batchgen.job.spec import JobSpec
from tests.job.conftest import chat


def job(**sampling) -> JobSpec:
    return JobSpec.from_dict({"input": {"path": "x.jsonl", "system_prompt": "Be brief."},
                              "output": {"path": "out"}, "sampling": sampling}, "/")


def row(i: int, prompt=None, messages=None, error=None, **data) -> Row:
    return Row(0, i, f"r{i}", data, prompt=prompt, messages=messages, error=error)


def test_chat_rows_use_the_template_and_the_system_prompt(tokenizer):
    planner = Planner(tokenizer, 512, job())
    plain, own_system, with_default = sorted(planner.plan([
        row(0, prompt="Once upon a time"),
        row(1, messages=[{"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}]),
        row(2, messages=chat("hi")),
    ]), key=lambda p: p.row.index)
    assert plain.token_ids.tolist() == tokenizer("Once upon a time")["input_ids"]
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *chat("hi")],
                                             tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(with_default.token_ids.tolist()) == expected
    assert "Be long." in tokenizer.decode(own_system.token_ids.tolist())  # the row's own system prompt wins
    assert "Be brief." not in tokenizer.decode(own_system.token_ids.tolist())


def test_good_rows_are_sorted_by_token_prefix_and_bad_rows_come_first(tokenizer):
    planner = Planner(tokenizer, 512, job())
    topics = ["cats", "the sea", "cats and dogs", "rain", "the sea at night", "cats"]
    rows = [row(i, messages=chat(f"Write a poem about {t}.")) for i, t in enumerate(topics)]
    rows.insert(3, row(99, prompt=""))
    planned = planner.plan(rows)
    assert planned[0].row.index == 99 and planned[0].error
    good = planned[1:]
    ids = [p.token_ids.tolist() for p in good]
    assert ids == sorted(ids)  # depth-first trie order: shared prefixes are adjacent
    order = [topics[p.row.index] for p in good]
    assert order.index("the sea") + 1 == order.index("the sea at night")
    assert order.count("cats") == 2 and abs(order.index("cats") - order.index("cats and dogs")) <= 2


@pytest.mark.parametrize("bad, message", [
    (row(0), "no prompt: the row has neither 'messages' nor 'prompt'"),
    (row(0, prompt=""), "'prompt' is empty"),
    (row(0, prompt=42), "'prompt' must be a string, got int"),
    (row(0, messages="hi"), "'messages' must be a non-empty list of {role, content} objects, got str"),
    (row(0, messages=[]), "got an empty list"),
    (row(0, messages=[{"content": "hi"}]), "messages[0].role must be a non-empty string, got null"),
    (row(0, messages=[{"role": "user", "content": 3}]), "messages[0].content must be a string, got int"),
    (row(0, messages=["hi"]), "messages[0] must be an object with role and content, got str"),
    (row(0, prompt="x" + " x" * 599), "prompt has 600 tokens, but max_model_len is 512"),
    (row(0, prompt="x", temperature=-1), "invalid per-row sampling value: SamplingParams.temperature=-1"),
    (row(0, prompt="x", max_tokens="lots"), "invalid per-row sampling value"),
    (row(0, prompt="x", n=2), "n=2 needs sampling.n > 1 in the job file"),
    (row(0, prompt="x", logprobs=3), "logprobs needs sampling.logprobs in the job file"),
    (row(0, error="line 1: malformed JSON: ..."), "line 1: malformed JSON: ..."),
    # Values SamplingParams would take but the engine cannot run.
    (row(0, prompt="x", max_tokens=True), "per-row max_tokens=True is invalid: must be an int64"),
    (row(0, prompt="x", seed=2**70), "per-row seed=1180591620717411303424 is invalid: must be an int64"),
    (row(0, prompt="x", temperature=float("nan")), "per-row temperature=nan is invalid: must be a finite number"),
    (row(0, prompt="x", ignore_eos="yes"), "per-row ignore_eos='yes' is invalid: must be true or false"),
    # Text the tokenizer refuses fails its own row, not the window's batched call.
    (row(0, prompt="broken \ud800 text"), "the prompt cannot be tokenized"),
])
def test_bad_rows_get_an_explaining_error(tokenizer, bad, message):
    (planned,) = Planner(tokenizer, 512, job()).plan([bad])
    assert planned.error is not None and message in planned.error


def test_an_untokenizable_row_does_not_fail_its_neighbours(tokenizer):
    planned = Planner(tokenizer, 512, job()).plan([row(0, prompt="fine"), row(1, prompt="\udc00"), row(2, prompt="ok")])
    assert {p.row.index: p.error is None for p in planned} == {0: True, 1: False, 2: True}


def test_per_row_sampling_overrides(tokenizer):
    planner = Planner(tokenizer, 512, job(max_tokens=32, temperature=0.0, n=2, logprobs=1))
    default, custom, pandas_float = sorted(planner.plan([
        row(0, prompt="a", max_tokens=None),
        row(1, prompt="b", max_tokens=5, temperature=0.7, stop=["\n"], n=1, logprobs=0),
        row(2, prompt="c", max_tokens=8.0, seed=3.0),
    ]), key=lambda p: p.row.index)
    assert default.params == planner.defaults
    assert (custom.params.max_tokens, custom.params.temperature, custom.params.stop, custom.params.n,
            custom.params.logprobs) == (5, 0.7, ["\n"], 1, 0)
    assert pandas_float.params.max_tokens == 8 and pandas_float.params.seed == 3


def test_windows_cover_every_row_once(tokenizer):
    planner = Planner(tokenizer, 512, job())
    windows = list(planner.windows((row(i, prompt=f"p{i}") for i in range(7)), size=3))
    assert [len(w) for w in windows] == [3, 3, 1]
    assert sorted(p.row.index for w in windows for p in w) == list(range(7))


def test_lora_rows_are_routed_by_their_column_and_grouped_by_adapter(tokenizer):
    spec = JobSpec.from_dict({"input": {"path": "x.jsonl"}, "output": {"path": "out"},
                              "lora": {"adapters": {"sql": "a", "poem": "b"}}}, "/")
    planner = Planner(tokenizer, 512, spec)
    prompts = ["the sea", "cats", "the sea at night", "rain", "cats and dogs", "dogs", "x", "y"]
    adapters = ["poem", None, "sql", "", "poem", "sql", "nope", 3]
    planned = planner.plan([row(i, prompt=p, lora=a) for i, (p, a) in enumerate(zip(prompts, adapters))])
    bad = {p.row.index: p.error for p in planned if p.error}
    assert bad == {6: "unknown LoRA adapter 'nope' in column 'lora'; the job's lora.adapters are 'sql', 'poem'",
                   7: "'lora' must be an adapter name (a string) or null, got int"}
    good = [p for p in planned if not p.error]
    keys = [(p.lora or "", p.token_ids.tolist()) for p in good]
    assert keys == sorted(keys)  # one adapter after the other, prefix order within each
    assert [p.lora for p in good].count(None) == 2  # null and "" are the base model
    assert {p.row.index: p.lora for p in good} == {0: "poem", 1: None, 2: "sql", 3: None, 4: "poem", 5: "sql"}
