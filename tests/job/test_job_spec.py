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
