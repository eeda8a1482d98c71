"""Compile grammars with xgrammar in a thread pool, once per distinct grammar.

The cache is keyed by the canonical JSON of the request's StructuredOutputsParams (sorted keys), so
the same schema written with its keys in another order compiles once. A compile runs in a worker
thread (xgrammar's C++ releases the GIL), so the engine keeps stepping other requests meanwhile.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from batchgen.sampling import StructuredOutputsParams

logger = logging.getLogger("batchgen")


class CompileError(ValueError):
    """The backend rejected the grammar; the message says why (becomes the row's error)."""


def build_tokenizer_info(tokenizer, vocab_width: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    """vocab_width: rows of the model's LM head, the width of the logits and of the bitmask. It may
    exceed the tokenizer's size (padded heads): the extra ids are never allowed."""
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_width,
                                              stop_token_ids=list(stop_token_ids) or None)


class GrammarCompilerPool:
    """submit(params) -> Future[(xgr.CompiledGrammar, time.monotonic() when the compile finished)];
    repeats of a grammar share one future."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, max_workers: int = 2, max_entries: int = 1024):
        # xgrammar's own cache is off: this one is keyed by our canonical JSON and bounded by entries.
        self.compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=max_workers, cache_enabled=False)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="batchgen-grammar")
        self.max_entries = max_entries
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def submit(self, params: StructuredOutputsParams) -> Future:
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = self.pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)  # the least recently used grammar
        return future

    def _compile(self, params: StructuredOutputsParams) -> tuple[xgr.CompiledGrammar, float]:
        try:
            return compile_grammar(self.compiler, params), time.monotonic()
        except CompileError:
            raise
        except Exception as e:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError/ValueError
            raise CompileError(f"structured_outputs.{params.kind} was rejected: {_clean(str(e))}") from None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def compile_grammar(compiler: xgr.GrammarCompiler, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
    kind = params.kind
    ws = params.max_whitespace if params.any_whitespace else None
    if kind == "json":
        return compiler.compile_json_schema(
            json.dumps(params.json), any_whitespace=params.any_whitespace, max_whitespace_cnt=ws,
            separators=None if params.any_whitespace else (",", ":"),
            strict_mode=params.disable_additional_properties)
    if kind == "json_object":  # as vLLM maps it: the schema of any object
        return compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=params.any_whitespace, max_whitespace_cnt=ws,
            separators=None if params.any_whitespace else (",", ":"), strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(params.regex)
    if kind == "choice":
        return compiler.compile_grammar(choice_grammar(params.choice))
    return compiler.compile_grammar(params.grammar)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON string escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(message: str) -> str:
    """xgrammar prefixes its messages with '[time] /path/file.cc:line: '; keep what says why."""
    message = message.strip().splitlines()[0] if message.strip() else message
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", message)
