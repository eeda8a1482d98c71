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

Sparse state: a row sees a few hundred distinct tokens out of a vocabulary of tens of thousands, so
each row that uses a processor keeps, in a slot of device tables kept across steps (freed when the
request finishes), the list of the tokens whose logit it changes, each once: the tokens seen (the
prompt's when repetition_penalty != 1, and the generated ones) and the logit_bias / one-token bad
word ids. Per entry:
  ids  [slots, width] int64: the token id
  vals [slots, 3, width] fp32: REP, r where the repetition penalty applies (seen), else 1 (x / 1 and
      x * 1 are x); PEN, the presence/frequency term p * (count > 0) + f * count, computed when the
      count changes (in numpy fp32: the dense definition's fp32 operations, the same bits); BIAS, the
      logit_bias, -inf for a banned token, else 0
The host keeps each row's {token: entry} and counts, so a step writes only the entries its rows'
new tokens change (usually one per row: one index_put per table, never a rescan of a history). A
step then gathers the logits at the rows' entries ([rows, width]), computes where(x > 0, x / REP,
x * REP) - PEN + BIAS and scatters the results back: O(rows x entries) instead of O(rows x vocab),
with the dense definition's values bit for bit (only a -0.0 logit with a 0 bias may come back +0.0).
Entries past a row's length are pads, copies of the row's entry 0 (same id, same values, kept so
when entry 0 changes and when the tables widen), so that the scatter's duplicate writes agree.
allowed_token_ids is dense by nature: those rows (and only those) keep their allowed logits, fill
the row with -inf and put them back. Multi-token bad words are matched on the host against the row's
last generated tokens and set -inf where completed.

`prepare()` does a step's bookkeeping; `write()` processes fp32 logits in place; `sparse()` returns
the entries' processed values and leaves the logits alone, for the sampler's greedy path
(batchgen.exec.sampler), which then needs no fp32 copy of the logits. Tables grow by doubling
(slots and width).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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
    rep: float
    presence: float
    frequency: float
    counts_outputs: bool  # any of the three penalties: the generated tokens become entries
    entries: dict[int, int] = field(default_factory=dict)  # token id -> entry index in the slot
    counts: dict[int, int] = field(default_factory=dict)  # token id -> occurrences in the output
    bias: dict[int, float] = field(default_factory=dict)  # logit_bias, -inf for one-token bad words
    counted: int = 0  # output tokens already in the tables
    multi_words: tuple[tuple[int, ...], ...] = ()  # bad words of 2+ tokens
    allowed: torch.Tensor | None = None  # [allowed] int64 on the device


@dataclass
class Prepared:
    """A step's rows with processors: their indices in the batch, their state, and the multi-token
    bad words their output completes (row index, token)."""
    active: list[int]
    states: list[_Row]
    banned: list[tuple[int, int]]

    @property
    def dense(self) -> bool:
        """Needs a pass over the vocabulary: allowed_token_ids, or a ban outside the entries."""
        return bool(self.banned) or any(s.allowed is not None for s in self.states)


@dataclass
class SparseStep:
    """A step's processed entries: row_idx [k] (the logits rows; None: rows 0..k-1 in order),
    ids [k, entries] int64, values [k, entries] fp32 (pads repeat the row's entry 0)."""
    row_idx: torch.Tensor | None
    ids: torch.Tensor
    values: torch.Tensor


REP, PEN, BIAS = range(3)  # the value planes of LogitsProcessors.vals


class LogitsProcessors:
    min_width = 64  # the tables' first width (entries per slot); doubled as needed

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, _Row] = {}
        self.free: list[int] = []
        self.lengths: list[int] = []  # per slot: entries in use
        self.ids = torch.zeros((0, 0), dtype=torch.int64, device=device)  # [slots, width]
        # [slots, 3, width] fp32: REP (r where the repetition penalty applies, else 1), PEN (the
        # presence/frequency term p * (count > 0) + f * count), BIAS (logit_bias, -inf for a ban, else 0)
        self.vals = torch.zeros((0, 3, 0), device=device)

    def _width(self, n: int) -> int:
        """A width for n entries: min_width times a power of two."""
        width = max(self.min_width, self.ids.shape[1])
        while width < n:
            width *= 2
        return width

    @property
    def slots(self) -> int:
        return self.ids.shape[0]

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self.free.append(row.slot)
                self.lengths[row.slot] = 0

    # ---- tables ------------------------------------------------------------------------------------

    def _grow(self, slots: int, width: int) -> None:
        old_slots, old_width = self.ids.shape
        if slots <= old_slots and width <= old_width:
            return
        slots, width = max(slots, old_slots), max(width, old_width)
        ids = torch.zeros((slots, width), dtype=torch.int64, device=self.device)
        vals = torch.zeros((slots, 3, width), device=self.device)
        vals[:, REP] = 1.0
        ids[:old_slots, :old_width] = self.ids
        vals[:old_slots, :, :old_width] = self.vals
        if old_width:  # new columns are pads: copies of entry 0
            ids[:old_slots, old_width:] = self.ids[:, :1]
            vals[:old_slots, :, old_width:] = self.vals[:, :, :1]
        self.ids, self.vals = ids, vals
        self.lengths += [0] * (slots - old_slots)

    def _slot(self) -> int:
        if not self.free:
            old = self.slots
            self._grow(max(8, 2 * old), max(self.ids.shape[1], self.min_width))
            self.free = list(range(self.slots - 1, old - 1, -1))
        return self.free.pop()

    def _register(self, r: ScheduledRequest) -> _Row:
        p = r.params
        counts_outputs = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        row = _Row(self._slot(), p.repetition_penalty, p.presence_penalty, p.frequency_penalty, counts_outputs)
        self.rows[r.request_id] = row
        words = getattr(p, "bad_words_token_ids", None) or []  # set by the engine, which has the tokenizer
        row.multi_words = tuple(tuple(w) for w in words if len(w) > 1)
        row.bias = {int(t): float(b) for t, b in (p.logit_bias or {}).items()}
        row.bias.update((w[0], float("-inf")) for w in words if len(w) == 1)
        if p.allowed_token_ids is not None:
            row.allowed = torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=self.device)
        prompt = r.all_token_ids[:len(r.all_token_ids) - r.num_output_tokens] if row.rep != 1.0 else []
        seen = set(prompt)  # generated tokens join as they come (_update)
        tokens = list(dict.fromkeys([*prompt, *row.bias]))  # each once, in a fixed order
        n = len(tokens)
        self.lengths[row.slot] = n
        if n:
            row.entries = {t: j for j, t in enumerate(tokens)}
            self._grow(self.slots, self._width(n))
            vals = torch.tensor([[row.rep if t in seen else 1.0 for t in tokens], [0.0] * n,
                                 [row.bias.get(t, 0.0) for t in tokens]], device=self.device)  # [3, n]
            self.ids[row.slot] = tokens[0]  # the pads: copies of entry 0
            self.vals[row.slot] = vals[:, :1]
            self.ids[row.slot, :n] = torch.tensor(tokens, dtype=torch.int64, device=self.device)
            self.vals[row.slot, :, :n] = vals
        return row

    def _update(self, rows: list[ScheduledRequest], active: list[int]) -> tuple[list[_Row], list[tuple[int, int]]]:
        """Registers new rows and adds the tokens each row gained since its last step. Returns the
        active rows' state and the multi-token bad words completed by the output so far (row, token)."""
        states: list[_Row] = []
        banned: list[tuple[int, int]] = []
        changed: dict[tuple[int, int], tuple[int, _Row]] = {}  # (slot, entry) -> (token, row), each once
        for i in active:
            r = rows[i]
            row = self.rows.get(r.request_id) or self._register(r)
            states.append(row)
            n_out = r.num_output_tokens
            if row.counts_outputs and n_out > row.counted:  # the tokens gained (usually one)
                for t in r.all_token_ids[len(r.all_token_ids) - n_out + row.counted:]:
                    j = row.entries.get(t)
                    if j is None:
                        j = row.entries[t] = self.lengths[row.slot]
                        self.lengths[row.slot] += 1
                    row.counts[t] = row.counts.get(t, 0) + 1
                    changed[(row.slot, j)] = (t, row)
            row.counted = n_out
            if row.multi_words:
                tail = r.all_token_ids[len(r.all_token_ids) - n_out:] if n_out else []
                for word in row.multi_words:
                    m = len(word) - 1
                    if len(tail) >= m and tuple(tail[len(tail) - m:]) == word[:-1]:
                        banned.append((i, word[-1]))
        if changed:
            self._write(changed, states)
        return states, banned

    def _write(self, changed: dict[tuple[int, int], tuple[int, _Row]], states: list[_Row]) -> None:
        """Writes the changed entries (new, or one more occurrence) in one index_put per table."""
        self._grow(self.slots, self._width(max(self.lengths[s.slot] for s in states)))
        rows = [row for _, row in changed.values()]
        tokens = [t for t, _ in changed.values()]
        count = np.array([row.counts[t] for t, row in changed.values()], dtype=np.float32)
        presence = np.array([row.presence for row in rows], dtype=np.float32)
        frequency = np.array([row.frequency for row in rows], dtype=np.float32)
        # The dense definition's fp32 operations, in numpy fp32 (IEEE: the same bits as torch's)
        pen = (count > 0).astype(np.float32) * presence + count * frequency
        vals = np.stack([np.array([row.rep for row in rows], dtype=np.float32), pen,
                         np.array([row.bias.get(t, 0.0) for t, row in changed.values()], dtype=np.float32)], 1)
        where = (torch.tensor([s for s, _ in changed], device=self.device),
                 torch.tensor([j for _, j in changed], device=self.device))
        self.ids.index_put_(where, torch.tensor(tokens, dtype=torch.int64, device=self.device))
        self.vals.permute(0, 2, 1).index_put_(where, torch.from_numpy(vals).to(self.device))  # [changed, 3]
        for slot in {s for s, j in changed if j == 0}:  # entry 0 changed: so do its pads
            self.vals[slot, :, self.lengths[slot]:] = self.vals[slot, :, :1]
            self.ids[slot, self.lengths[slot]:] = self.ids[slot, 0]

    # ---- a step --------------------------------------------------------------------------------------

    def _sparse(self, logits: torch.Tensor, rows: list[int], states: list[_Row]) -> SparseStep | None:
        """The processed values at the entries of `rows` (the logits rows whose state is `states`)."""
        keep = [(i, s) for i, s in zip(rows, states) if self.lengths[s.slot]]
        if not keep:
            return None
        width = max(self.lengths[s.slot] for _, s in keep)
        dev = self.device
        slots = [s.slot for _, s in keep]
        if slots == list(range(slots[0], slots[0] + len(slots))):  # in slot order: views, no copies
            ids, vals = self.ids[slots[0]:slots[0] + len(slots), :width], self.vals[slots[0]:slots[0] + len(slots), :, :width]
        else:
            slot_idx = torch.tensor(slots, device=dev)
            ids = self.ids[:, :width].index_select(0, slot_idx)  # [k, width]
            vals = self.vals[:, :, :width].index_select(0, slot_idx)  # [k, 3, width]
        row_list = [i for i, _ in keep]
        row_idx = None if row_list == list(range(len(row_list))) else torch.tensor(row_list, device=dev)
        if row_idx is None:
            g = logits[:len(row_list)].gather(1, ids).float()  # [k, width]; an upcast is exact
        else:
            g = logits[row_idx.unsqueeze(1), ids].float()
        if any(s.rep != 1.0 for _, s in keep):
            rep = vals[:, REP]
            g = torch.where(g > 0, g / rep, g * rep)
        if any(s.presence != 0.0 or s.frequency != 0.0 for _, s in keep):
            g = g - vals[:, PEN]
        if any(s.bias for _, s in keep):
            g = g + vals[:, BIAS]
        return SparseStep(row_idx, ids, g)

    def prepare(self, rows: list[ScheduledRequest]) -> Prepared | None:
        """Counts this step's new tokens (call once per step); None where no row has a processor."""
        active = [i for i, r in enumerate(rows) if r.params.uses_logits_processors]
        if not active:
            return None
        states, banned = self._update(rows, active)
        return Prepared(active, states, banned)

    def sparse(self, logits: torch.Tensor, step: Prepared) -> SparseStep | None:
        """The processed entries, the logits left as they are (any float dtype); None where no entry
        changes. Only for a step that is not `dense` (its allowed ids and bans are not in them)."""
        assert not step.dense
        return self._sparse(logits, step.active, step.states)

    def write(self, logits: torch.Tensor, step: Prepared) -> torch.Tensor:
        """logits: [rows, vocab] fp32, processed in place and returned."""
        sparse = self._sparse(logits, step.active, step.states)
        if sparse is not None:
            if sparse.row_idx is None:
                logits[:sparse.ids.shape[0]].scatter_(1, sparse.ids, sparse.values)
            else:
                logits.index_put_((sparse.row_idx.unsqueeze(1).expand_as(sparse.ids), sparse.ids), sparse.values)
        for i, s in zip(step.active, step.states):
            if s.allowed is not None:  # -inf but at the allowed ids; after logit_bias: the same sums
                kept = logits[i, s.allowed]
                logits[i].fill_(float("-inf"))
                logits[i, s.allowed] = kept
        if step.banned:
            dev = self.device
            logits[torch.tensor([i for i, _ in step.banned], device=dev),
                   torch.tensor([t for _, t in step.banned], device=dev)] = float("-inf")
        return logits

    def apply(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        """logits: [rows, vocab] fp32, processed in place and returned (prepare + write)."""
        step = self.prepare(rows)
        return logits if step is None else self.write(logits, step)


