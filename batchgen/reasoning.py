"""Reasoning models: where the reasoning block is, the answer apart from it, and a budget for it
(pure Python, no torch: the scheduler's requests use it).

Markers: `output.reasoning: {start: "<think>", end: "</think>"}` or a named parser
(`deepseek_r1`, `qwen3`: both mean <think> ... </think>). They are matched as token sequences (the
tokenizer's encoding of each marker; reasoning models make them single added tokens), so a
tokenizer that treats them as special tokens (skipped when decoding) still splits right.

The split of one completion (generated tokens, given the prompt):
  - the block is open at the start of generation when the prompt's last start marker has no end
    marker after it (the chat template opened it, as DeepSeek-R1's and Qwen3's do); otherwise it
    opens at the first start marker the model generates;
  - reasoning_text is the text inside the block, generated_text what follows the end marker (plus
    any text before a generated start marker); the markers are in neither; both are stripped of
    surrounding whitespace;
  - a prompt that opened and closed the block (thinking off) and a completion without any block
    give an empty reasoning_text;
  - a block that never closes (the row ran out of max_tokens) leaves everything in reasoning_text
    and generated_text empty; finish_reason is "length".
thinking_token_budget N: once N tokens were generated inside an open block, the engine forces the
end marker's tokens (one per step) and the answer continues within max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

PARSERS = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}


def parse_reasoning(value) -> tuple[str, str] | None:
    """A parser name or {start, end} -> (start, end); None: off. ValueError says what is wrong."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PARSERS:
            raise ValueError(f"unknown reasoning parser {value!r}; expected one of {', '.join(PARSERS)} "
                             "or {start, end}")
        return PARSERS[value]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"start": value[0], "end": value[1]}
    if not isinstance(value, dict) or set(value) != {"start", "end"}:
        raise ValueError(f"{value!r} is not allowed; expected a parser name ({', '.join(PARSERS)}) or {{start, end}}")
    start, end = value["start"], value["end"]
    if not (isinstance(start, str) and start.strip() and isinstance(end, str) and end.strip()) or start == end:
        raise ValueError("start and end must be two different non-blank strings")
    return start, end


@dataclass(frozen=True)
class Markers:
    start: tuple[int, ...]
    end: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer, start: str, end: str) -> Markers:
        return cls(tuple(tokenizer.encode(start, add_special_tokens=False)),
                   tuple(tokenizer.encode(end, add_special_tokens=False)))


def _find(ids, seq: tuple[int, ...], start: int = 0) -> int:
    """First index >= start where seq occurs in ids; -1 if none."""
    n = len(seq)
    first = seq[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and tuple(ids[i:i + n]) == seq:
            return i
    return -1


def _rfind(ids, seq: tuple[int, ...]) -> int:
    n = len(seq)
    for i in range(len(ids) - n, -1, -1):
        if tuple(ids[i:i + n]) == seq:
            return i
    return -1


def prompt_opens_block(prompt_ids, markers: Markers) -> bool:
    """The prompt's last start marker has no end marker after it."""
    s = _rfind(prompt_ids, markers.start)
    return s >= 0 and _find(prompt_ids, markers.end, s + len(markers.start)) < 0


@dataclass
class Split:
    reasoning_ids: list[int]
    answer_ids: list[int]
    closed: bool  # the block ended (or there was none)


def split_ids(prompt_ids, output_ids, markers: Markers) -> Split:
    """The output's reasoning and answer token ids, markers dropped (see the module docstring)."""
    out = list(output_ids)
    if prompt_opens_block(prompt_ids, markers):
        before, body_from = [], 0
    else:
        s = _find(out, markers.start)
        if s < 0:
            return Split([], out, True)
        before, body_from = out[:s], s + len(markers.start)
    e = _find(out, markers.end, body_from)
    if e < 0:
        return Split(out[body_from:], before, False)
    return Split(out[body_from:e], before + out[e + len(markers.end):], True)


class BudgetTracker:
    """thinking_token_budget for one request: counts generated tokens inside an open block and,
    once the budget is spent, hands out the end marker's tokens to force, one per step."""

    def __init__(self, prompt_ids, markers: Markers, budget: int):
        self.markers = markers
        self.budget = budget
        self.open = prompt_opens_block(prompt_ids, markers)
        self.inside = 0  # tokens generated inside the open block
        self.done = False  # the block closed: nothing more to do
        self.forcing: list[int] = list(markers.end) if self.open and budget == 0 else []  # to force

    def observe(self, token_ids: list[int]) -> None:
        """token_ids (prompt + output) has just gained its last token."""
        if self.done:
            return
        if not self.open:
            n = len(self.markers.start)
            if tuple(token_ids[-n:]) == self.markers.start:
                self.open = True
                if self.budget == 0:
                    self.forcing = list(self.markers.end)
            return
        n = len(self.markers.end)
        if tuple(token_ids[-n:]) == self.markers.end:
            self.done, self.forcing = True, []
            return
        if self.forcing:
            self.forcing.pop(0)
            return
        self.inside += 1
        if self.inside >= self.budget:
            self.forcing = list(self.markers.end)

    def forced_token(self) -> int | None:
        """The token the next step must produce, if the budget is spent."""
        if self.done or not self.forcing:
            return None
        return self.forcing[0]
