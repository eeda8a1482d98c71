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
request finishes), the list of the tokens whose logit it changes: the tokens seen (the prompt's
when repetition_penalty != 1, and the generated ones) and the logit_bias / one-token bad word ids,
each once. Per entry, [slots, width]:
  ids  int64: the token id
  rep  fp32:  r where the repetition penalty applies to it (seen), else 1 (x / 1 and x * 1 are x)
  cnt  fp32:  its occurrences among the generated tokens
  bias fp32:  its logit_bias, -inf for a banned token, else 0
The host keeps each row's {token: entry} so a step adds only the tokens gained since the last one
(usually one per row: two index_puts for the batch, never a rescan of a history). A step then
gathers the logits at the rows' entries ([rows, entries]), applies the formulas above and scatters
the results back: O(rows x entries), not O(rows x vocab). The same values as the dense definition,
bit for bit (the same fp32 operations on the same numbers; only a -0.0 logit with a 0 bias may come
back +0.0). Entries past a row's length are pads: they take the row's entry 0 (same id, same value)
so that the scatter's duplicate writes agree. allowed_token_ids is dense by nature: those rows (and
only those) keep their allowed logits, fill the row with -inf and put them back. Multi-token bad words
are matched on the host against the row's last generated tokens and set -inf where completed.

`sparse()` returns the entries and their processed values without touching the logits, for the
sampler's greedy path (batchgen.exec.sampler), which then needs no fp32 copy of the logits.
Tables grow by doubling (slots and width).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    seen: set[int] = field(default_factory=set)  # tokens whose entry has rep = r (repetition_penalty != 1)
    counted: int = 0  # output tokens already in the tables
    multi_words: tuple[tuple[int, ...], ...] = ()  # bad words of 2+ tokens
    has_bias: bool = False  # some entry has a logit_bias or a ban
    allowed: torch.Tensor | None = None  # [allowed] int64 on the device


@dataclass
class SparseStep:
    """A step's processed entries: row_idx [k] (the logits rows; None: rows 0..k-1 in order),
    ids [k, entries] int64, values [k, entries] fp32 (pads repeat the row's entry 0)."""
    row_idx: torch.Tensor | None
    ids: torch.Tensor
    values: torch.Tensor


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


class LogitsProcessors:
    _TABLES = {"ids": (torch.int64, 0), "rep": (torch.float32, 1.0), "cnt": (torch.float32, 0.0),
               "bias": (torch.float32, 0.0)}  # name -> (dtype, value of an unused entry)

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, _Row] = {}
        self.free: list[int] = []
        self.slots = 0
        self.width = 0
        self.tables: dict[str, torch.Tensor] = {}  # _TABLES' names -> [slots, width]
        self._lengths: dict[int, int] = {}  # slot -> entries in use

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self.free.append(row.slot)
                self._lengths.pop(row.slot, None)

    # ---- tables ------------------------------------------------------------------------------------

    def _grow(self, slots: int, width: int) -> None:
        if slots <= self.slots and width <= self.width:
            return
        slots, width = max(slots, self.slots), max(width, self.width)
        for name, (dtype, unused) in self._TABLES.items():
            new = torch.full((slots, width), unused, dtype=dtype, device=self.device)
            old = self.tables.get(name)
            if old is not None:
                new[:old.shape[0], :old.shape[1]] = old
            self.tables[name] = new
        self.slots, self.width = slots, width

    def _slot(self) -> int:
        if not self.free:
            old = self.slots
            self._grow(max(8, 2 * old), max(self.width, 64))
            self.free = list(range(self.slots - 1, old - 1, -1))
        slot = self.free.pop()
        for name, (_, unused) in self._TABLES.items():  # a reused slot starts clean
            self.tables[name][slot].fill_(unused)
        self._lengths[slot] = 0
        return slot

    def _register(self, r: ScheduledRequest) -> _Row:
        p = r.params
        counts_outputs = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        row = _Row(self._slot(), p.repetition_penalty, p.presence_penalty, p.frequency_penalty, counts_outputs)
        self.rows[r.request_id] = row
        words = getattr(p, "bad_words_token_ids", None) or []  # set by the engine, which has the tokenizer
        row.multi_words = tuple(tuple(w) for w in words if len(w) > 1)
        bias = {int(t): float(b) for t, b in (p.logit_bias or {}).items()}
        bias.update((w[0], float("-inf")) for w in words if len(w) == 1)
        if p.allowed_token_ids is not None:
            row.allowed = torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=self.device)
        prompt = r.all_token_ids[:len(r.all_token_ids) - r.num_output_tokens] if row.rep != 1.0 else []
        tokens = list(dict.fromkeys([*prompt, *bias]))  # each once, in a fixed order
        row.has_bias = bool(bias)
        if tokens:
            row.seen.update(prompt)
            row.entries = {t: j for j, t in enumerate(tokens)}
            self._grow(self.slots, _pow2_at_least(len(tokens)))
            n = len(tokens)
            self.tables["ids"][row.slot, :n] = torch.tensor(tokens, dtype=torch.int64, device=self.device)
            self.tables["rep"][row.slot, :n] = torch.tensor(
                [row.rep if t in row.seen else 1.0 for t in tokens], device=self.device)
            self.tables["bias"][row.slot, :n] = torch.tensor([bias.get(t, 0.0) for t in tokens],
                                                             device=self.device)
            self._lengths[row.slot] = n
        return row

    def _update(self, rows: list[ScheduledRequest], active: list[int]) -> tuple[list[_Row], list[tuple[int, int]]]:
        """Registers new rows and adds the tokens each row gained since its last step. Returns the
        active rows' state and the multi-token bad words completed by the output so far (row, token)."""
        states: list[_Row] = []
        banned: list[tuple[int, int]] = []
        set_slot, set_pos, set_id, set_rep = [], [], [], []  # entries new or newly seen
        inc_slot, inc_pos = [], []  # one more occurrence
        for i in active:
            r = rows[i]
            row = self.rows.get(r.request_id) or self._register(r)
            states.append(row)
            n_out = r.num_output_tokens
            if row.counts_outputs and n_out > row.counted:  # the tokens gained (usually one)
                n = self._lengths[row.slot]
                for t in r.all_token_ids[len(r.all_token_ids) - n_out + row.counted:]:
                    j = row.entries.get(t)
                    if j is None:
                        j = row.entries[t] = n
                        n += 1
                    if t not in row.seen:  # new, or a bias-only entry: now the repetition penalty applies
                        row.seen.add(t)
                        set_slot.append(row.slot), set_pos.append(j), set_id.append(t), set_rep.append(row.rep)
                    inc_slot.append(row.slot), inc_pos.append(j)
                self._lengths[row.slot] = n
            row.counted = n_out
            if row.multi_words:
                tail = r.all_token_ids[len(r.all_token_ids) - n_out:] if n_out else []
                for word in row.multi_words:
                    m = len(word) - 1
                    if len(tail) >= m and tuple(tail[len(tail) - m:]) == word[:-1]:
                        banned.append((i, word[-1]))
        if inc_slot:
            self._grow(self.slots, _pow2_at_least(max(self._lengths[s.slot] for s in states)))
            if set_slot:
                where = (torch.tensor(set_slot, device=self.device), torch.tensor(set_pos, device=self.device))
                self.tables["ids"].index_put_(where, torch.tensor(set_id, dtype=torch.int64, device=self.device))
                self.tables["rep"].index_put_(where, torch.tensor(set_rep, device=self.device))
            where = (torch.tensor(inc_slot, device=self.device), torch.tensor(inc_pos, device=self.device))
            self.tables["cnt"].index_put_(where, torch.ones(len(inc_slot), device=self.device), accumulate=True)
        return states, banned

    # ---- a step --------------------------------------------------------------------------------------

    def _sparse(self, logits: torch.Tensor, rows: list[int], states: list[_Row]) -> SparseStep | None:
        """The processed values at the entries of `rows` (the logits rows whose state is `states`)."""
        keep = [(i, s) for i, s in zip(rows, states) if self._lengths[s.slot]]
        if not keep:
            return None
        lengths = [self._lengths[s.slot] for _, s in keep]
        width = max(lengths)
        dev = self.device
        slot_idx = torch.tensor([s.slot for _, s in keep], device=dev)
        ids, rep, cnt, bias = (self.tables[n][:, :width].index_select(0, slot_idx) for n in ("ids", "rep", "cnt", "bias"))
        pad = torch.arange(width, device=dev) >= torch.tensor(lengths, device=dev).unsqueeze(1)  # [k, width]
        if min(lengths) < width:
            ids = torch.where(pad, ids[:, :1], ids)  # pads repeat entry 0: their writes agree with it
        row_list = [i for i, _ in keep]
        row_idx = None if row_list == list(range(len(row_list))) else torch.tensor(row_list, device=dev)
        if row_idx is None:
            g = logits[:len(row_list)].gather(1, ids).float()  # [k, width]; an upcast is exact
        else:
            g = logits[row_idx.unsqueeze(1), ids].float()
        if any(s.rep != 1.0 for _, s in keep):
            g = torch.where(g > 0, g / rep, g * rep)
        if any(s.presence != 0.0 or s.frequency != 0.0 for _, s in keep):
            pres = torch.tensor([s.presence for _, s in keep], device=dev).unsqueeze(1)
            freq = torch.tensor([s.frequency for _, s in keep], device=dev).unsqueeze(1)
            g = g - (cnt > 0).float().mul_(pres).add_(cnt.mul_(freq))  # cnt is a gathered copy
        if any(s.has_bias for _, s in keep):
            g = g + bias
        if min(lengths) < width:
            g = torch.where(pad, g[:, :1], g)
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


def _pow2_at_least(n: int) -> int:
    return 1 << max(6, (n - 1).bit_length())
