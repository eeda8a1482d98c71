"""OpenAI Batch end to end: an input file with response_format runs through the CLI, and
`batchgen merge --format openai-batch` writes lines that the `openai` package's own types accept,
whose content follows the requested schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batchgen.job.openai_batch import OpenAIBatchError, parse_line
from batchgen.job.openai_output import batch_line
from tests.job.conftest import chat, run_cli, write_job, write_jsonl

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["city", "population"], "additionalProperties": False}


def _line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_response_format_maps_as_vllm_maps_it():
    schema_line = _line("a", {"messages": chat("x"), "response_format": {
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}})
    assert json.loads(parse_line(schema_line)["structured_outputs"]) == {"json": CITY}
    obj_line = _line("b", {"messages": chat("x"), "response_format": {"type": "json_object"}})
    assert json.loads(parse_line(obj_line)["structured_outputs"]) == {"json_object": True}
    text_line = _line("c", {"messages": chat("x"), "response_format": {"type": "text"}})
    assert "structured_outputs" not in parse_line(text_line)
    with pytest.raises(OpenAIBatchError, match="response_format.type 'xml' is not supported"):
        parse_line(_line("d", {"messages": chat("x"), "response_format": {"type": "xml"}}))
    with pytest.raises(OpenAIBatchError, match="json_schema.schema is missing"):
        parse_line(_line("e", {"messages": chat("x"), "response_format": {"type": "json_schema",
                                                                          "json_schema": {"name": "n"}}}))


def test_error_rows_are_400_with_an_openai_error_body():
    line, is_error = batch_line({"id": "x", "error": "body.foo is not supported", "generated_text": None,
                                 "finish_reason": "error"}, 3, "m", 0)
    assert is_error and line["custom_id"] == "x" and line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["message"] == "body.foo is not supported"
    assert line["response"]["body"]["error"]["type"] == "invalid_request_error"


def test_openai_batch_round_trip(tmp_path):
    lines = [
        _line("city-1", {"model": "gpt-4o-mini", "messages": chat("Name a big city and its population."),
                         "max_tokens": 64, "temperature": 1.0, "seed": 1,
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "city", "schema": CITY, "strict": True}}}),
        _line("obj-2", {"messages": chat("Give a JSON object describing a cat."), "max_tokens": 32,
                        "temperature": 0, "response_format": {"type": "json_object"}}),
        _line("cmpl-3", {"prompt": "The answer is", "max_tokens": 24, "temperature": 0,
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "c", "schema": CITY}}}, "/v1/completions"),
        _line("plain-4", {"messages": chat("Say hi."), "max_tokens": 6, "n": 1}),
        _line("bad-5", {"messages": chat("x"), "response_format": {"type": "json_schema",
                                                                   "json_schema": {"name": "b", "schema": {"type": "wat"}}}}),
        _line("bad-6", {"messages": chat("x"), "response_format": {"type": "grammarz"}}),
        _line("city-7", {"messages": chat("Another city, as JSON."), "max_tokens": 64, "temperature": 0,
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "city", "schema": CITY}}}),
    ]
    write_jsonl(tmp_path / "batch.jsonl", lines)
    job = write_job(tmp_path / "job.yaml", model={"path": "smollm2-135m", "dtype": "float32"},
                    input={"path": "batch.jsonl", "format": "openai-batch"}, output={"path": "out"},
                    sampling={"max_tokens": 16, "temperature": 0.0},
                    engine={"max_model_len": 384, "max_num_seqs": 8, "num_kv_blocks": 256})
    result = run_cli("run", "-q", str(job), timeout=1200)
    assert result.returncode == 0, result.stderr
    merged = run_cli("merge", str(tmp_path / "out"), "--to", str(tmp_path / "results.jsonl"),
                     "--format", "openai-batch", "--errors-to", str(tmp_path / "errors.jsonl"))
    assert merged.returncode == 0, merged.stderr
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["city-1", "obj-2", "cmpl-3", "plain-4", "city-7"]  # input order
    assert [e["custom_id"] for e in errors] == ["bad-5", "bad-6"]

    for line in results + errors:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_") and set(line["response"]) == {"status_code", "request_id", "body"}
    by_id = {r["custom_id"]: r for r in results}
    for custom_id, line in by_id.items():
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        if custom_id == "cmpl-3":
            completion = Completion.model_validate(body)
            assert completion.object == "text_completion" and completion.usage.completion_tokens > 0
            text = completion.choices[0].text
        else:
            completion = ChatCompletion.model_validate(body)
            assert completion.object == "chat.completion" and completion.choices[0].message.role == "assistant"
            text = completion.choices[0].message.content
        assert completion.model == "smollm2-135m"
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
        reason = completion.choices[0].finish_reason
        if custom_id in ("city-1", "city-7") and reason == "stop":
            jsonschema.validate(json.loads(text), CITY)
        if custom_id == "obj-2" and reason == "stop":
            assert isinstance(json.loads(text), dict)
        if custom_id == "cmpl-3":
            assert text.startswith("{")
    assert by_id["city-7"]["response"]["body"]["choices"][0]["finish_reason"] == "stop"  # greedy closes its JSON
    assert "structured_outputs.json was rejected" in errors[0]["response"]["body"]["error"]["message"]
    assert "response_format.type 'grammarz' is not supported" in errors[1]["response"]["body"]["error"]["message"]
    for e in errors:
        assert e["response"]["status_code"] == 400

    # Without --errors-to, one file holds every line, in input order.
    both = run_cli("merge", str(tmp_path / "out"), "--to", str(tmp_path / "all.jsonl"), "--format", "openai-batch")
    assert both.returncode == 0, both.stderr
    assert [json.loads(x)["custom_id"] for x in (tmp_path / "all.jsonl").read_text().splitlines()] == \
        [x["custom_id"] for x in lines]


def test_n_samples_become_choices_of_one_body():
    row = {"id": "r", "messages": chat("x"), "generated_text": ["a", "b"], "finish_reason": ["stop", "length"],
           "num_prompt_tokens": 5, "num_generated_tokens": 7, "error": None}
    line, is_error = batch_line(row, 0, "smollm2-135m", 123)
    body = ChatCompletion.model_validate(line["response"]["body"])
    assert not is_error and [c.message.content for c in body.choices] == ["a", "b"]
    assert [c.finish_reason for c in body.choices] == ["stop", "length"] and body.usage.total_tokens == 12
    again, _ = batch_line(row, 0, "smollm2-135m", 123)
    assert again == line  # merging twice writes the same ids
