"""Merged output rows as OpenAI Batch output lines: `batchgen merge OUT --format openai-batch`.

One line per row, in the order the rows come (input order), shaped as OpenAI writes them:

    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ...,
     "body": <chat.completion | text_completion>}, "error": null}

A row with `messages` was a /v1/chat/completions line, one with `prompt` a /v1/completions line (the
merge needs those columns: output.keep_columns all, the default, or naming them). A row that failed
gets status_code 400 and an OpenAI error body ({"error": {"message", "type", "param", "code"}}), as
the API answers a request it refuses; with errors_to those lines go to their own file, as OpenAI's
batch puts them in the batch's error file. Ids are derived from the row's position and custom_id,
so merging twice writes the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from batchgen.job import store


def _hex(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def batch_line(row: dict[str, Any], index: int, model: str, created: int) -> tuple[dict[str, Any], bool]:
    """(the output line of merged row number `index`, whether it is an error line)."""
    custom_id = row.get("id")
    line_id = f"batch_req_{_hex('line', index, custom_id)}"
    request_id = f"req_{_hex('request', index, custom_id)}"
    if row.get("error") is not None:
        body = {"error": {"message": row["error"], "type": "invalid_request_error", "param": None, "code": None}}
        return ({"id": line_id, "custom_id": custom_id,
                 "response": {"status_code": 400, "request_id": request_id, "body": body}, "error": None}, True)
    texts = _as_list(row.get("generated_text"))
    reasons = _as_list(row.get("finish_reason"))
    usage = {"prompt_tokens": int(row.get("num_prompt_tokens") or 0),
             "completion_tokens": int(row.get("num_generated_tokens") or 0)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if row.get("messages") is None and row.get("prompt") is not None:  # a /v1/completions line
        body = {"id": f"cmpl-{_hex('completion', index, custom_id)}", "object": "text_completion",
                "created": created, "model": model,
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))],
                "usage": usage}
    else:
        body = {"id": f"chatcmpl-{_hex('chat', index, custom_id)}", "object": "chat.completion",
                "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason, "logprobs": None}
                            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))],
                "usage": usage}
    return ({"id": line_id, "custom_id": custom_id,
             "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}, False)


def batch_lines(rows: Iterable[dict[str, Any]], model: str, created: int | None = None
                ) -> Iterator[tuple[dict[str, Any], bool]]:
    """rows: merged output rows (dicts of output columns) in input order."""
    created = int(time.time()) if created is None else created
    for index, row in enumerate(rows):
        yield batch_line(row, index, model, created)


def write_batch_output(rows: Iterable[dict[str, Any]], model: str, to: str, errors_to: str | None = None,
                       created: int | None = None) -> dict[str, int]:
    """Write the lines of `rows` to `to` (error lines to errors_to when given); each file appears whole
    or not at all. Returns {"lines", "errors"}."""
    counts = {"lines": 0, "errors": 0}
    fs, path = store.open_store(to)
    err_fs, err_path = store.open_store(errors_to) if errors_to else (None, None)
    with store.atomic_open(fs, path) as raw:
        out = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
        err_buffer = io.StringIO()  # an errors file is small: written after the main one succeeds
        for line, is_error in batch_lines(rows, model, created):
            text = json.dumps(line, ensure_ascii=False) + "\n"
            counts["lines"] += 1
            counts["errors"] += is_error
            if is_error and errors_to:
                err_buffer.write(text)
            else:
                out.write(text)
        out.flush()
        out.detach()
    if errors_to:
        with store.atomic_open(err_fs, err_path) as raw:
            raw.write(err_buffer.getvalue().encode("utf-8"))
    return counts


def merge_openai_batch(urls: list[str], to: str, errors_to: str | None = None,
                       allow_partial: bool = False) -> dict[str, Any]:
    """`batchgen merge --format openai-batch`: the committed rows of one job, in input order, as OpenAI
    batch output lines. Returns merge's totals plus "lines"."""
    import pyarrow as pa

    from batchgen.job.columns import decode_json_columns
    from batchgen.job.merge import MergeError
    from batchgen.job.outdir import JobOutput
    from batchgen.job.outputs import OutputError, merged_rows, outputs_to_merge

    dirs, unfinished, all_started = outputs_to_merge(urls, allow_partial)
    merged, total = merged_rows(dirs)  # streams: one batch of rows at a time, in input order
    totals = merged.totals(total)
    model = JobOutput(dirs[0]).root.read_manifest()["fingerprint"]["model"]["path"]
    rows = (row for batch in merged.batches() for row in decode_json_columns(pa.Table.from_batches([batch])))
    try:
        totals.update(write_batch_output(rows, model, to, errors_to))
    except MergeError as e:
        raise OutputError(str(e)) from None
    if unfinished:
        totals["complete"] = False
    if not all_started:
        totals["rows_total"] = None
    totals["unfinished"] = unfinished
    return totals
