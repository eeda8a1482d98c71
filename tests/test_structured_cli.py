"""Structured outputs through the real CLI: a JSONL job whose every row carries its own schema (or
regex, choice, grammar) in a `structured_outputs` column, sampled at temperature 1.0 on the embedded
model. Oracles: json.loads + jsonschema, re.fullmatch, set membership, and xgrammar's own matcher
for the EBNF rows."""

from __future__ import annotations

import json
import re

import jsonschema
import pyarrow.parquet as pq
import xgrammar as xgr

from tests.job.conftest import run_cli, write_job, write_jsonl

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required=None, **props) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


SCHEMAS = [
    obj(name={"type": "string", "maxLength": 10}),
    obj(age={"type": "integer", "minimum": 0, "maximum": 120}),
    obj(score={"type": "number", "minimum": 0, "maximum": 1}),
    obj(ok=B),
    obj(color={"enum": ["red", "green", "blue"]}),
    obj(code={"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}),
    obj(tags={"type": "array", "items": S, "minItems": 1, "maxItems": 3}),
    obj(nums={"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2,
              "maxItems": 4}),
    obj(user=obj(id={"type": "integer", "minimum": 1}, email={"type": "string", "maxLength": 20})),
    obj(point=obj(x=N, y=N)),
    obj(a=I, b=S, c=B),
    obj(required=["id"], id=I, note={"type": "string", "maxLength": 8}),
    obj(level={"type": "integer", "enum": [1, 2, 3]}),
    obj(status={"enum": ["todo", "doing", "done"]}, priority={"type": "integer", "minimum": 1, "maximum": 5}),
    obj(items={"type": "array", "items": obj(sku={"type": "string", "pattern": "^[a-z]{2,4}$"},
                                             qty={"type": "integer", "minimum": 1, "maximum": 9}),
               "minItems": 1, "maxItems": 2}),
    obj(date={"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}),
    obj(title={"type": "string", "maxLength": 15}, year={"type": "integer", "minimum": 1900, "maximum": 2030}),
    obj(matrix={"type": "array", "items": {"type": "array", "items": I, "minItems": 2, "maxItems": 2},
                "minItems": 2, "maxItems": 2}),
    obj(temp={"type": "number", "minimum": -40, "maximum": 50}, unit={"enum": ["C", "F"]}),
    obj(meta=obj(version={"type": "integer", "minimum": 0, "maximum": 9}, beta=B)),
    obj(answer={"enum": ["yes", "no", "maybe"]}, confidence={"type": "number", "minimum": 0, "maximum": 1}),
    obj(words={"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}),
    obj(zip={"type": "string", "pattern": "^[0-9]{5}$"}),
    obj(flags={"type": "array", "items": B, "minItems": 3, "maxItems": 3}),
    obj(required=["kind"], kind={"enum": ["cat", "dog"]}, legs={"type": "integer", "minimum": 0, "maximum": 4}),
    obj(city={"type": "string", "maxLength": 12}, pop={"type": "integer", "minimum": 0}),
    obj(rgb={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}, "minItems": 3,
             "maxItems": 3}),
    obj(a=obj(b=obj(c={"type": "integer", "minimum": 0, "maximum": 9}))),
    obj(price={"type": "number", "minimum": 0, "maximum": 1000}, currency={"enum": ["USD", "EUR"]}),
    obj(id={"type": "string", "pattern": "^id-[0-9]{3}$"}, active=B),
    obj(lang={"enum": ["en", "fr", "de"]}, words={"type": "integer", "minimum": 1, "maximum": 500}),
    obj(pair={"type": "array", "items": S, "minItems": 2, "maxItems": 2}, n={"type": "integer", "maximum": 10}),
]
REGEXES = [r"[A-Z][a-z]{2,8} [0-9]{1,3}", r"(yes|no), because [a-z ]{5,20}\.", r"[0-9]{3}-[0-9]{4}"]
CHOICES = [["positive", "negative", "neutral"], ["A", "B", "C", "D"]]
GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num)*\nnum ::= [1-9] [0-9]?'


def test_per_row_grammars_through_the_cli_follow_their_schemas(tmp_path, smol_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    rows = [{"id": f"s{i:02d}", "prompt": f"Write a JSON record ({i}):",
             "structured_outputs": json.dumps({"json": schema})} for i, schema in enumerate(SCHEMAS)]
    rows += [{"id": f"r{i}", "prompt": "Write something:", "structured_outputs": json.dumps({"regex": r})}
             for i, r in enumerate(REGEXES)]
    rows += [{"id": f"c{i}", "prompt": "Pick one:", "structured_outputs": json.dumps({"choice": c})}
             for i, c in enumerate(CHOICES)]
    rows += [{"id": "g0", "prompt": "An arithmetic expression:", "structured_outputs": json.dumps({"grammar": GRAMMAR})},
             {"id": "bad", "prompt": "x", "structured_outputs": json.dumps({"json": {"type": "integerz"}})},
             {"id": "free", "prompt": "Hello there,", "max_tokens": 16}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    job = write_job(tmp_path / "job.yaml", model={"path": "smollm2-135m", "dtype": "float32"},
                    input={"path": "rows.jsonl"}, output={"path": "out"},
                    sampling={"max_tokens": 128, "temperature": 1.0, "seed": 0},
                    engine={"max_model_len": 384, "max_num_seqs": 48, "num_kv_blocks": 1024})
    result = run_cli("run", "-q", str(job), timeout=1500)
    assert result.returncode == 0, result.stderr
    assert run_cli("merge", str(tmp_path / "out"), "--to", str(tmp_path / "all.parquet")).returncode == 0
    by_id = {r["id"]: r for r in pq.read_table(tmp_path / "all.parquet").to_pylist()}
    assert len(by_id) == len(rows)

    finished = 0
    for i, schema in enumerate(SCHEMAS):
        row = by_id[f"s{i:02d}"]
        assert row["error"] is None, row["error"]
        if row["finish_reason"] == "length":
            continue  # cut by max_tokens: not expected to be whole
        assert row["finish_reason"] == "stop"
        jsonschema.validate(json.loads(row["generated_text"]), schema)
        finished += 1
    assert finished >= 0.8 * len(SCHEMAS), f"only {finished}/{len(SCHEMAS)} JSON rows finished on their own"
    for i, pattern in enumerate(REGEXES):
        row = by_id[f"r{i}"]
        if row["finish_reason"] == "stop":
            assert re.fullmatch(pattern, row["generated_text"]), (pattern, row["generated_text"])
    for i, choice in enumerate(CHOICES):
        assert by_id[f"c{i}"]["finish_reason"] == "stop" and by_id[f"c{i}"]["generated_text"] in choice
    row = by_id["g0"]
    if row["finish_reason"] == "stop":  # parses: xgrammar's matcher accepts the whole text and may end there
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
                                     .compile_grammar(GRAMMAR))
        assert matcher.accept_string(row["generated_text"]) and matcher.is_completed(), row["generated_text"]
        assert re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?)*\)", row["generated_text"])
    assert "structured_outputs.json was rejected" in by_id["bad"]["error"]
    assert by_id["free"]["error"] is None and by_id["free"]["num_generated_tokens"] > 0


def test_job_wide_schema_and_bad_values_name_the_field(tmp_path):
    from batchgen.job.spec import JobSpecError, load_spec

    schema = obj(answer={"enum": ["yes", "no"]})
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "Is water wet?"},
                                          {"id": "b", "prompt": "Colour?", "structured_outputs": '{"choice": ["red"]}'},
                                          {"id": "c", "prompt": "x", "structured_outputs": "{oops"}])
    job = write_job(tmp_path / "job.yaml", input={"path": "rows.jsonl"}, output={"path": "out"},
                    sampling={"max_tokens": 24, "temperature": 0.0, "structured_outputs": {"json": schema}},
                    engine={"max_model_len": 256, "max_num_seqs": 4, "num_kv_blocks": 64})
    spec = load_spec(str(job))
    assert spec.sampling.structured_outputs.json == schema
    bad = write_job(tmp_path / "bad.yaml", input={"path": "rows.jsonl"}, output={"path": "out"},
                    sampling={"structured_outputs": {"json": {}, "regex": "a"}})
    try:
        load_spec(str(bad))
    except JobSpecError as e:
        assert str(e).startswith("sampling.structured_outputs:") and "exactly one of" in str(e)
    else:
        raise AssertionError("two grammar kinds were accepted")

    result = run_cli("run", "-q", str(job))
    assert result.returncode == 0, result.stderr
    assert run_cli("merge", str(tmp_path / "out"), "--to", str(tmp_path / "all.parquet")).returncode == 0
    by_id = {r["id"]: r for r in pq.read_table(tmp_path / "all.parquet").to_pylist()}
    jsonschema.validate(json.loads(by_id["a"]["generated_text"]), schema)
    assert by_id["b"]["generated_text"] == "red"
    assert "structured_outputs" in by_id["c"]["error"] and "not valid JSON" in by_id["c"]["error"]
