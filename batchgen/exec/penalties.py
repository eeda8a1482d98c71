"""Logits processors over a batch: penalties, logit_bias, allowed_token_ids and bad_words.

Semantics, per row, on the raw logits (before temperature and the top-k/top-p/min-p filters):
  repetition_penalty r (HF's RepetitionPenaltyLogitsProcessor, vLLM): every token that occurs in the
      prompt or the output so far: logit / r when the logit is > 0, logit * r otherwise.
  presence_penalty p, frequency_penalty f (OpenAI): logit -= f * count + p * (count > 0), with count
      the token's occurrences among the generated tokens (the prompt does not count).
  logit_bias {token id: b}: logit += b.
  allowed_token_ids: every other token gets -inf.
  bad_words (vLLM): each word is encoded as is and with a leading space (when that gives another
      token sequence of the same length, as vLLM does); a one-token sequence is never generated, a
      longer one's last token gets -inf when the output so far ends with its other tokens.
Order: repetition, frequency/presence, bias and bans (as vLLM applies them).

State: a row that uses any of these takes a slot in device tables kept across steps (freed when
the request finishes):
  counts [slots, vocab] fp32: how often each token was generated, updated with only the tokens a
      row gained since its last step (one index_put_ for the batch: no rescan of any history)
  seen   [slots, vocab] bool: the prompt's and the generated tokens (repetition_penalty), updated
      with counts
  bias   [slots, vocab] fp32: logit_bias, and -inf for tokens outside allowed_token_ids and for
      one-token bad words
A table is allocated only when some row needs it, and grows by doubling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchgen.sampling import SamplingParams
from batchgen.sched.output import ScheduledRequest


def bad_words_token_ids(params: SamplingParams, tokenizer) -> list[list[int]]:
    """vLLM's encoding of bad_words: each word without and with a leading space."""
    out: list[list[int]] = []
    for word in params.bad_words or []:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


@dataclass
class _Row:
    slot: int
    counted: int = 0  # output tokens already in counts
    multi_words: tuple[tuple[int, ...], ...] = ()  # bad words of 2+ tokens


class LogitsProcessors:
    def __init__(self, device: torch.device):
        self.vocab = 0  # the logits' width, known at the first apply
        self.device = device
        self.rows: dict[str, _Row] = {}
        self.free: list[int] = []
        self.capacity = 0
        self.tables: dict[str, torch.Tensor] = {}  # "counts" | "seen" | "bias" -> [capacity, vocab]

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self.free.append(row.slot)

    def _table(self, name: str) -> torch.Tensor:
        t = self.tables.get(name)
        if t is None or t.shape[0] < self.capacity:
            dtype = torch.bool if name == "seen" else torch.float32
            new = torch.zeros((self.capacity, self.vocab), dtype=dtype, device=self.device)
            if t is not None:
                new[:t.shape[0]] = t
            self.tables[name] = t = new
        return t

    def _slot(self) -> int:
        if not self.free:
            old = self.capacity
            self.capacity = max(8, 2 * old)
            self.free = list(range(self.capacity - 1, old - 1, -1))
        slot = self.free.pop()
        for t in self.tables.values():
            if slot < t.shape[0]:
                t[slot] = 0
        return slot

    def _register(self, r: ScheduledRequest) -> _Row:
        p = r.params
        row = _Row(self._slot())
        self.rows[r.request_id] = row
        if p.repetition_penalty != 1.0:
            prompt = r.all_token_ids[:len(r.all_token_ids) - r.num_output_tokens]
            self._table("seen")[row.slot, torch.tensor(prompt, device=self.device)] = True
        words = getattr(p, "bad_words_token_ids", None) or []  # set by the engine, which has the tokenizer
        row.multi_words = tuple(tuple(w) for w in words if len(w) > 1)
        banned = [w[0] for w in words if len(w) == 1]
        if p.logit_bias or p.allowed_token_ids is not None or banned:
            bias = self._table("bias")
            if p.allowed_token_ids is not None:
                bias[row.slot] = float("-inf")
                bias[row.slot, torch.tensor(p.allowed_token_ids, device=self.device)] = 0.0
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=self.device)
                bias[row.slot, ids] += torch.tensor(list(p.logit_bias.values()), device=self.device)
            if banned:
                bias[row.slot, torch.tensor(banned, device=self.device)] = float("-inf")
        return row

    @staticmethod
    def _needs_counts(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def apply(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        """logits: [rows, vocab] fp32. Returns them processed (a new tensor or `logits` changed in place)."""
        active = [i for i, r in enumerate(rows) if r.params.uses_logits_processors]
        if not active:
            return logits
        self.vocab = logits.shape[1]
        slots, count_rows, count_tokens = [], [], []
        banned_rows, banned_tokens = [], []  # multi-token bad words completed by this step's token
        for k, i in enumerate(active):
            r = rows[i]
            row = self.rows.get(r.request_id) or self._register(r)
            slots.append(row.slot)
            n_out = r.num_output_tokens
            if self._needs_counts(r.params):
                first = row.counted
                if n_out > first:  # the tokens gained since the last step (usually one)
                    new = r.all_token_ids[len(r.all_token_ids) - n_out + first:]
                    count_rows.extend([row.slot] * len(new))
                    count_tokens.extend(new)
                row.counted = n_out
            if row.multi_words:
                tail = r.all_token_ids[len(r.all_token_ids) - n_out:] if n_out else []
                for word in row.multi_words:
                    m = len(word) - 1
                    if len(tail) >= m and tuple(tail[len(tail) - m:]) == word[:-1]:
                        banned_rows.append(k)
                        banned_tokens.append(word[-1])
        if count_tokens:
            ones = torch.ones(len(count_tokens), device=self.device)
            where = (torch.tensor(count_rows, device=self.device), torch.tensor(count_tokens, device=self.device))
            self._table("counts").index_put_(where, ones, accumulate=True)
            if "seen" in self.tables:  # only rows with repetition_penalty read it
                self._table("seen").index_put_(where, torch.ones(len(count_tokens), dtype=torch.bool,
                                                                 device=self.device))
        params = [rows[i].params for i in active]
        idx = torch.tensor(active, device=self.device)
        slot_idx = torch.tensor(slots, device=self.device)
        every = len(active) == len(rows)  # the common case: no gather and scatter of the logits
        sub = logits if every else logits[idx]  # [active, vocab]
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = torch.tensor([p.repetition_penalty for p in params], device=self.device).unsqueeze(1)
            seen = self._table("seen")[slot_idx]  # [active, vocab]
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            counts = self._table("counts")[slot_idx]  # [active, vocab]
            freq = torch.tensor([p.frequency_penalty for p in params], device=self.device).unsqueeze(1)
            pres = torch.tensor([p.presence_penalty for p in params], device=self.device).unsqueeze(1)
            penalty = (counts > 0).float().mul_(pres).add_(counts.mul_(freq))  # counts is a gathered copy
            sub = sub.sub_(penalty)
        if "bias" in self.tables:
            sub = sub + self._table("bias")[slot_idx]
        if banned_tokens:
            sub[torch.tensor(banned_rows, device=self.device), torch.tensor(banned_tokens, device=self.device)] = \
                float("-inf")
        if every:
            return sub
        logits[idx] = sub
        return logits
