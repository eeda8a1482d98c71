"""Runaway-generation guard (pure Python): stop a row whose output ends in a short period repeated
many times, with finish_reason "repetition", instead of letting it run to max_tokens.

Parameters (SamplingParams.repetition_detection; True means all defaults):
  max_period:  the longest repeating unit looked for, in tokens (default 32)
  min_repeats: how many back-to-back copies of the unit end the row (default 10)
The row stops when, for some period p <= max_period, its last p * min_repeats generated tokens are
min_repeats copies of the same p tokens. Prompt tokens never count.

State per row is one run length per period (how many trailing output tokens equal the token p
before them), updated in O(max_period) per new token: no rescan of the history.
"""

from __future__ import annotations

DEFAULTS = {"max_period": 32, "min_repeats": 10}


def check_params(value) -> dict[str, int]:
    """The parameters with defaults filled in; ValueError says what is wrong."""
    if value is True:
        return dict(DEFAULTS)
    if not isinstance(value, dict):
        raise ValueError("must be true or an object {max_period, min_repeats}")
    unknown = set(value) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; expected max_period, min_repeats")
    params = {**DEFAULTS, **{k: v for k, v in value.items() if v is not None}}
    for key, low in (("max_period", 1), ("min_repeats", 2)):
        v = params[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{key} must be an int >= {low}, got {v!r}")
    return params


class RepetitionDetector:
    def __init__(self, params) -> None:
        p = check_params(params)
        self.max_period = p["max_period"]
        self.min_repeats = p["min_repeats"]
        self.runs = [0] * (self.max_period + 1)  # runs[p]: trailing outputs equal to the token p before

    def observe(self, token_ids: list[int], num_prompt: int) -> bool:
        """token_ids (prompt + output) has just gained its last token; True when the output's tail is
        a runaway repetition."""
        n = len(token_ids) - num_prompt  # output tokens
        last = token_ids[-1]
        hit = False
        for p in range(1, self.max_period + 1):
            if n > p and token_ids[-1 - p] == last:
                self.runs[p] += 1
                # runs[p] + p trailing tokens have period p: that many tokens are runs/p + 1 copies
                if self.runs[p] >= p * (self.min_repeats - 1):
                    hit = True
            else:
                self.runs[p] = 0
        return hit
