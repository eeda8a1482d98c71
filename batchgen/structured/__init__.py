"""Structured outputs: grammars (JSON schema, regex, choice, EBNF) compiled once per distinct grammar
with xgrammar, one matcher per sequence, and the token bitmask that keeps sampling inside the grammar.

grammar.py compiles off the engine loop and caches; matchers.py holds the per-sequence state and
fills and applies the bitmask each step. The engine wires both in; the scheduler only sees a
request's `grammar_ready` flag.
"""

from batchgen.structured.grammar import CompileError, GrammarCompilerPool
from batchgen.structured.matchers import StructuredState

__all__ = ["CompileError", "GrammarCompilerPool", "StructuredState"]
