"""Incremental detokenization, for requests with stop strings only (others decode once at the end)."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so the first output token gets its leading space right


class IncrementalDetokenizer:
    """Appends the text of new tokens; holds back a trailing partial UTF-8 character (U+FFFD) until
    the next token completes it. Stop strings are matched across token boundaries."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> tuple[int, str] | None:
        """Add one token; return (position, stop string) of the earliest stop string in the new text."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += delta
        found = [(at, stop) for stop in self.stop if (at := self.text.find(stop, search_from)) != -1]
        if not found:
            return None
        return min(found)
