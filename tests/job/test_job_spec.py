"""Job file validation: every error names the field path, what was found and what is allowed."""

from __future__ import annotations

import os

import pytest
import yaml

from batchgen.job.spec import JobSpec, JobSpecError, apply_overrides, load_spec


def minimal(**changes) -> dict:
    raw = {"input": {"path": "data/*.jsonl"}, "output": {"path": "out/"}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return raw


def error_of(raw) -> str:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_dict(raw, "/jobs")
    return str(info.value)


def test_minimal_job_gets_defaults_and_paths_relative_to_the_job_file():
    spec = JobSpec.from_dict(minimal(), "/jobs")
    assert spec.input.paths == ("/jobs/data/*.jsonl",)
    assert spec.output.path == "/jobs/out"
    assert spec.model.path == "smollm2-135m" and spec.model.dtype == "auto"
    assert spec.input.format == "auto" and spec.input.group_window == 100_000
    assert spec.output.keep_columns == "all" and spec.on_error == "record"
    assert spec.sampling.max_tokens == 16  # SamplingParams (vLLM) defaults
    assert spec.engine_config().model == "smollm2-135m"


def test_urls_and_absolute_paths_are_kept():
    spec = JobSpec.from_dict(minimal(input__path=["s3://bucket/x/*.parquet", "/abs/y.jsonl"],
                                     output__path="memory://out"), "/jobs")
    assert spec.input.paths == ("s3://bucket/x/*.parquet", "/abs/y.jsonl")
    assert spec.output.path == "memory://out"


@pytest.mark.parametrize("changes, expected", [
    ({"input__format": "xml"},
     "input.format: 'xml' is not allowed; expected one of auto, parquet, jsonl, openai-batch, hf-dataset"),
    ({"on_error": "ignore"}, "on_error: 'ignore' is not allowed; expected one of record, skip, fail"),
    ({"model__dtype": "int4"}, "model.dtype: 'int4' is not allowed; expected one of auto, float32, bfloat16, float16"),
    ({"input__group_window": 0}, "input.group_window: 0 is not allowed; expected an integer >= 1"),
    ({"output__commit_every_rows": "many"}, "output.commit_every_rows: 'many' is not allowed; expected an integer >= 1"),
    ({"output__commit_every_seconds": -1}, "output.commit_every_seconds: -1 is not allowed; expected a number >= 0"),
    ({"input__id_column": 3}, "input.id_column: 3 is not allowed; expected a non-empty string or null"),
    ({"output__keep_columns": "some"}, "output.keep_columns: 'some' is not allowed; expected all, none, or a list"),
    ({"output__keep_columns": ["topic", "error"]}, "output.keep_columns: 'error' is not allowed: it is an output column"),
    ({"sampling__temperature": -1}, "sampling.temperature: -1 is not allowed; must be a number >= 0"),
    ({"sampling__top_p": 2}, "sampling.top_p: 2 is not allowed; must be in (0, 1]"),
    ({"engine__max_model_len": 0}, "engine.max_model_len: 0 is not allowed; expected an int >= 1"),
    ({"engine__model": "x"}, "engine.model: not allowed here; set model.path"),
    ({"input__path": []}, "input.path: an empty list is not allowed"),
    ({"input__path": ["a.jsonl", 3]}, "input.path[1]: 3 is not allowed"),
    ({"input": {"format": "jsonl"}}, "input.path: missing"),
    ({"input": "data.jsonl"}, "input: a string is not allowed; expected a mapping"),
])
def test_errors_name_the_field_path(changes, expected):
    assert expected in error_of(minimal(**changes))


def test_unknown_fields_are_refused_with_a_suggestion():
    message = error_of(minimal(output__comit_every_rows=5))
    assert message.startswith("output.comit_every_rows: unknown field (did you mean commit_every_rows?)")
    assert "unknown field" in error_of(minimal(sampling__max_token=5))
    assert error_of(minimal(engine__max_num_seq=5)).startswith("engine.max_num_seq: unknown field (did you mean max_num_seqs?)")
    assert error_of(minimal(extra={})).startswith("extra: unknown field")


def test_missing_sections_and_non_mapping_files():
    assert "output: missing" in error_of({"input": {"path": "x.jsonl"}})
    assert "the job file: a list is not allowed" in error_of([1, 2])
    assert "prompt_column and messages_column are both null" in error_of(
        minimal(input__prompt_column=None, input__messages_column=None))


def test_overrides_parse_values_as_yaml_and_create_sections():
    raw = apply_overrides(minimal(), ["sampling.max_tokens=64", "sampling.stop=[a, b]", "engine.enable_prefix_caching=false",
                                      "input.system_prompt=Be brief: very brief"])
    spec = JobSpec.from_dict(raw, "/jobs")
    assert spec.sampling.max_tokens == 64 and spec.sampling.stop == ["a", "b"]
    assert spec.engine == {"enable_prefix_caching": False}
    assert spec.input.system_prompt == "Be brief: very brief"


@pytest.mark.parametrize("item", ["sampling", "=3", "sampling..x=1", "input.path.deeper=1"])
def test_bad_overrides_are_refused(item):
    with pytest.raises(JobSpecError, match="--set"):
        apply_overrides(minimal(), [item])


def test_load_spec_resolves_against_the_job_file_directory(tmp_path, monkeypatch):
    job = tmp_path / "jobs" / "job.yaml"
    job.parent.mkdir()
    job.write_text(yaml.safe_dump(minimal(input__path="../data/x.jsonl")))
    monkeypatch.chdir("/")
    spec = load_spec(job, ["output.path=results"])
    assert spec.input.paths == (str(tmp_path / "data" / "x.jsonl"),)
    assert spec.output.path == str(tmp_path / "jobs" / "results")
    assert spec.source == os.fspath(job)


def test_load_spec_reports_yaml_and_missing_files(tmp_path):
    with pytest.raises(JobSpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_spec(bad)


def test_shipped_job_files_are_valid():
    jobs = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")
    names = [n for n in os.listdir(jobs) if n.endswith(".yaml")]
    assert "demo.yaml" in names
    for name in names:
        load_spec(os.path.join(jobs, name))


# ---- speculative, lora, sharding ------------------------------------------------------------------

def test_speculative_section_becomes_the_engine_config():
    spec = JobSpec.from_dict(minimal(speculative={"method": "ngram", "num_speculative_tokens": 4,
                                                  "prompt_lookup_max": 5}), "/jobs")
    config = spec.engine_config()
    assert config.speculative.method == "ngram" and config.speculative.num_speculative_tokens == 4
    assert config.speculative.prompt_lookup_max == 5
    assert JobSpec.from_dict(minimal(), "/jobs").engine_config().speculative is None
    draft = JobSpec.from_dict(minimal(speculative={"method": "draft", "draft_model": "models/tiny"}), "/jobs")
    assert draft.speculative["draft_model"] == "models/tiny"  # not beside the job file: kept as an alias


@pytest.mark.parametrize("changes, expected", [
    ({"speculative": {"method": "medusa"}}, "speculative.method: 'medusa' is not allowed; expected one of ngram, draft"),
    ({"speculative": {"num_speculative_tokens": 0}},
     "speculative.num_speculative_tokens: 0 is not allowed; expected an int >= 1"),
    ({"speculative": {"method": "draft"}}, "speculative.draft_model: None is not allowed"),
    ({"speculative": {"prompt_lookup_min": 3, "prompt_lookup_max": 2}}, "speculative.prompt_lookup_max: 2 is not allowed"),
    ({"speculative": {"num_tokens": 2}}, "speculative.num_tokens: unknown field"),
    ({"speculative": "ngram"}, "speculative: a string is not allowed; expected a mapping"),
    ({"engine__speculative": {"method": "ngram"}}, "engine.speculative: not allowed here; set the speculative: section"),
    ({"engine__lora_adapters": {"a": "x"}}, "engine.lora_adapters: not allowed here; set lora.adapters"),
    ({"lora": {"column": "lora"}}, "lora.adapters: missing; expected a mapping of adapter name -> PEFT LoRA directory"),
    ({"lora": {"adapters": {}}}, "lora.adapters: {} is not allowed"),
    ({"lora": {"adapters": {"a": 3}}}, "lora.adapters.a: 3 is not allowed; expected the path of a PEFT LoRA directory"),
    ({"lora": {"adapters": {"a": "x"}, "max_loras": 0}}, "lora.max_loras: 0 is not allowed; expected an integer >= 1"),
    ({"lora": {"adapters": {"a": "x"}, "colum": "x"}}, "lora.colum: unknown field (did you mean column?)"),
    ({"sharding": {"num_tasks": 0}}, "sharding.num_tasks: 0 is not allowed; expected an integer >= 1 or null"),
    ({"sharding": {"task_index": 3, "num_tasks": 2}}, "sharding.task_index: 3 is not allowed; expected an integer in [0, 2)"),
    ({"sharding": {"data_parallel": 0}}, "sharding.data_parallel: 0 is not allowed; expected auto or an integer >= 1"),
])
def test_new_section_errors_name_the_field_path(changes, expected):
    assert expected in error_of(minimal(**changes))


def test_lora_section_paths_are_relative_to_the_job_file_and_reach_the_engine_config():
    spec = JobSpec.from_dict(minimal(lora={"adapters": {"sql": "adapters/sql", "abs": "/x/y"}, "column": "adapter",
                                           "max_loras": 2}, output__keep_columns=["topic"]), "/jobs")
    assert spec.lora.adapters == {"sql": "/jobs/adapters/sql", "abs": "/x/y"}
    config = spec.engine_config()
    assert config.lora_adapters == {"sql": "/jobs/adapters/sql", "abs": "/x/y"}
    assert (config.max_loras, config.max_lora_rank) == (2, 64)
    assert spec.read_columns == {"topic", "adapter"}  # the adapter column is read even when not kept


def test_sharding_section():
    spec = JobSpec.from_dict(minimal(sharding={"num_tasks": 4, "task_index": 1, "data_parallel": "auto"}), "/jobs")
    assert (spec.sharding.num_tasks, spec.sharding.task_index, spec.sharding.data_parallel) == (4, 1, "auto")
    assert JobSpec.from_dict(minimal(sharding={"data_parallel": 2}), "/jobs").sharding.data_parallel == 2


def test_lora_is_part_of_the_fingerprint_and_speculative_and_sharding_are_not():
    from batchgen.job.fingerprint import job_fingerprint

    base = job_fingerprint(JobSpec.from_dict(minimal(), "/jobs"), [])
    fast = job_fingerprint(JobSpec.from_dict(minimal(speculative={"method": "ngram"},
                                                     sharding={"num_tasks": 3}), "/jobs"), [])
    assert base == fast and "lora" not in base
    lora = job_fingerprint(JobSpec.from_dict(minimal(lora={"adapters": {"a": "a"}}), "/jobs"), [])
    assert lora["lora"] == {"adapters": {"a": "/jobs/a"}, "column": "lora"}
