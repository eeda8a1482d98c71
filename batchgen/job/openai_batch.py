"""OpenAI batch input lines ({"custom_id", "method", "url", "body"}) as batchgen rows.

The body's chat `messages` or completion `prompt` becomes the row's prompt and its sampling
fields become per-row overrides under vLLM's names. A body field batchgen cannot honour is the
row's error, not silently dropped: the caller asked for that behaviour and would not get it.
"""

from __future__ import annotations

import json
from typing import Any

URLS = ("/v1/chat/completions", "/v1/completions")

# body field -> SamplingParams field
_SAMPLING = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
             "top_p": "top_p", "seed": "seed", "stop": "stop", "n": "n",
             "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty", "logit_bias": "logit_bias",
             # vLLM's extra body fields
             "repetition_penalty": "repetition_penalty", "top_k": "top_k", "min_p": "min_p", "min_tokens": "min_tokens",
             "allowed_token_ids": "allowed_token_ids", "bad_words": "bad_words",
             "include_stop_str_in_output": "include_stop_str_in_output",
             "truncate_prompt_tokens": "truncate_prompt_tokens", "chat_template_kwargs": "chat_template_kwargs",
             "thinking_token_budget": "thinking_token_budget"}
# Fields that do not change what is generated.
_IGNORED = {"model", "user", "metadata", "store", "service_tier"}
# Fields accepted only at the value that means "off".
_NEUTRAL = {"stream": False, "parallel_tool_calls": None, "tools": None, "tool_choice": None}


class OpenAIBatchError(ValueError):
    pass


def parse_line(obj: dict[str, Any]) -> dict[str, Any]:
    """The row columns of one batch line; raises OpenAIBatchError saying what is wrong.

    The columns are `messages` or `prompt` plus the sampling overrides, so a row from an OpenAI
    batch is planned exactly like a JSONL row with the same columns. `custom_id` is the row's id.
    """
    if obj.get("method", "POST") != "POST":
        raise OpenAIBatchError(f"method {obj.get('method')!r} is not supported; expected POST")
    url = obj.get("url", URLS[0])
    if url not in URLS:
        raise OpenAIBatchError(f"url {url!r} is not supported; expected one of {', '.join(URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise OpenAIBatchError("body is missing or not an object")
    return _body_columns(body)


def _body_columns(body: dict[str, Any]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    if "messages" in body:
        columns["messages"] = body["messages"]
    elif "prompt" in body:
        columns["prompt"] = body["prompt"]
    for key, value in body.items():
        if key in ("messages", "prompt") or key in _IGNORED or value is None:
            continue
        if key in _SAMPLING:
            columns[_SAMPLING[key]] = value
        elif key in ("logprobs", "top_logprobs"):
            continue  # below: the pair maps onto one field
        elif key == "response_format":
            structured = _response_format(value)
            if structured is not None:  # JSON text: every row's schema differs, a kept column stays a string
                columns["structured_outputs"] = json.dumps(structured)
        elif key == "structured_outputs":  # vLLM's own body field: {"json": ...} | {"regex": ...} | ...
            columns["structured_outputs"] = value if isinstance(value, str) else json.dumps(value)
        elif key in _NEUTRAL and value in (_NEUTRAL[key], [], {}):
            continue
        else:
            raise OpenAIBatchError(f"body.{key} is not supported")
    logprobs = _logprobs(body)
    if logprobs is not None:
        columns["logprobs"] = logprobs
    return columns


def _logprobs(body: dict[str, Any]) -> int | None:
    """Chat asks with logprobs=true + top_logprobs=k; completions with logprobs=k. Both mean k top alternatives."""
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    if value is True:
        top = body.get("top_logprobs", 0)
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise OpenAIBatchError(f"body.top_logprobs {top!r} is not allowed; expected an integer >= 0")
        return top
    if isinstance(value, int) and value >= 0:
        return value
    raise OpenAIBatchError(f"body.logprobs {value!r} is not allowed; expected true/false or an integer >= 0")


def _response_format(value: Any) -> dict[str, Any] | None:
    """response_format as vLLM's run_batch maps it: text -> none, json_object -> any JSON object,
    json_schema -> the schema (strict is accepted either way: the output always follows the schema)."""
    if not isinstance(value, dict):
        raise OpenAIBatchError(f"body.response_format must be an object with a type, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise OpenAIBatchError("body.response_format.json_schema must be an object with name and schema")
        schema = spec.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise OpenAIBatchError("body.response_format.json_schema.schema is missing or not a JSON schema object")
        if spec.get("strict") not in (None, True, False):
            raise OpenAIBatchError(f"body.response_format.json_schema.strict {spec.get('strict')!r} is not allowed; "
                                   "expected true or false")
        return {"json": schema}
    raise OpenAIBatchError(f"body.response_format.type {kind!r} is not supported; expected text, json_object "
                           "or json_schema")
