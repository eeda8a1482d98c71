"""Token sampling for a batch of rows with per-row parameters.

Order of operations, per row: (structured-output mask), penalties, logit_bias and bans
(batchgen.exec.penalties), min_tokens suppression of stop ids, then greedy (temperature 0) or
temperature -> top-k -> top-p -> min-p -> draw. A draw is argmax(p / E) with E ~ Exp(1) drawn from the
row's own generator when it has a seed (the same text whatever else is in the batch) and from the
engine's shared generator otherwise: argmax(p_i / E_i) picks token i with probability p_i.
Logprobs are the model's raw log-softmax, before temperature and filters (as vLLM reports them).
A batch of greedy rows whose processors are sparse (no allowed_token_ids, no multi-token ban due)
takes the argmax in the logits' own dtype, weighed against the processed entries (Sampler._greedy):
the token of the fp32 path without its [rows, vocab] fp32 copy.
"""

from __future__ import annotations

import torch

from batchgen.exec.penalties import LogitsProcessors
from batchgen.models import fused
from batchgen.sched.output import ScheduledRequest


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.row_generators: dict[str, torch.Generator] = {}
        self.processors = LogitsProcessors(device)
        # Structured outputs (batchgen.structured.StructuredState): masks grammar-forbidden tokens; set by the engine
        self.structured = None

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.row_generators.pop(rid, None)
        self.processors.forget(request_ids)

    def generator_for(self, row: ScheduledRequest) -> torch.Generator:
        """The row's own generator when it has a seed, else the shared one."""
        if row.seed is None:
            return self.generator
        gen = self.row_generators.get(row.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(row.seed)
            self.row_generators[row.request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, rows: list[ScheduledRequest]
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits: [rows, vocab] in any float dtype. Returns the sampled token and, where asked, top
        logprobs per row."""
        if self.structured is not None:  # first: the grammar's mask comes before every other transform
            logits = self.structured.apply(logits, rows)
        step = self.processors.prepare(rows)  # counts the step's new tokens, whichever path follows
        if all(r.params.greedy and r.params.logprobs is None and not self._suppress_stop(r) for r in rows) \
                and (step is None or not step.dense):
            return self._forced(self._greedy(logits, step).tolist(), rows), [None] * len(rows)
        logits = logits.float()
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]

        if step is not None:  # penalties, logit_bias, allowed ids, bad words
            logits = self.processors.write(logits, step)
        for i, r in enumerate(rows):
            if self._suppress_stop(r):
                logits[i, list(r.stop_ids)] = float("-inf")

        tokens = logits.argmax(dim=-1)  # [rows]; greedy rows are done here
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], [rows[i] for i in random_rows])
        token_list = self._forced(tokens.tolist(), rows)

        logprobs: list[dict[int, float] | None] = [None] * len(rows)
        if raw_logprobs is not None:
            for i, r in enumerate(rows):
                if r.params.logprobs is None:
                    continue
                entry = {}
                if r.params.logprobs > 0:
                    top = raw_logprobs[i].topk(r.params.logprobs)
                    entry = dict(zip(top.indices.tolist(), top.values.tolist()))
                entry[token_list[i]] = raw_logprobs[i, token_list[i]].item()
                logprobs[i] = entry
        return token_list, logprobs

    def _greedy(self, logits: torch.Tensor, step) -> torch.Tensor:
        """Greedy tokens [rows] for rows whose processors are sparse, in the logits' own dtype: the
        processed fp32 logits differ from the upcast ones only at the entries, so the argmax of the
        others (the entries set to -inf in place) is weighed against the best entry, a tie going to the
        lower id as in torch.argmax: the token argmax of the fp32-processed logits gives, without a
        [rows, vocab] fp32 copy (the upcast is exact)."""
        sparse = None if step is None else self.processors.sparse(logits, step)
        if sparse is None:
            return fused.argmax(logits)
        k = sparse.ids.shape[0]
        row_idx = torch.arange(k, device=logits.device) if sparse.row_idx is None else sparse.row_idx
        logits[row_idx.unsqueeze(1), sparse.ids] = float("-inf")  # [k, entries]
        best = fused.argmax(logits)  # [rows]: the best token outside the entries
        other = best[row_idx]  # [k]
        other_value = logits[row_idx, other].float()
        entry_value = sparse.values.amax(dim=1)  # [k]
        at_max = sparse.values == entry_value.unsqueeze(1)
        entry_id = torch.where(at_max, sparse.ids, logits.shape[1]).amin(dim=1)  # the lowest id at the max
        take = (entry_value > other_value) | ((entry_value == other_value) & (entry_id < other))
        best[row_idx] = torch.where(take, entry_id, other)
        return best

    @staticmethod
    def _forced(tokens: list[int], rows: list[ScheduledRequest]) -> list[int]:
        """thinking_token_budget spent: the end marker, whatever was drawn."""
        for i, r in enumerate(rows):
            if r.forced_token is not None:
                tokens[i] = r.forced_token
        return tokens

    @staticmethod
    def _suppress_stop(row: ScheduledRequest) -> bool:
        """min_tokens not reached yet: the row's stop ids may not be drawn."""
        return row.num_output_tokens < row.params.min_tokens and bool(row.stop_ids)

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        probs = filtered_probs(logits, rows)  # [rows, vocab]
        noise = torch.empty_like(probs)
        shared = []
        for i, r in enumerate(rows):
            if r.seed is None:
                shared.append(i)
            else:
                noise[i].exponential_(generator=self.generator_for(r))
        if shared:
            noise[shared] = torch.empty((len(shared), probs.shape[1]), device=probs.device).exponential_(
                generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to logits [rows, vocab]; returns probabilities."""
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device, dtype=logits.dtype)
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[1]

    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    if min(top_k) < vocab:
        k = torch.tensor(top_k, device=device)
        kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))

    top_p = [r.params.top_p for r in rows]
    if min(top_p) < 1.0:
        p = torch.tensor(top_p, device=device, dtype=logits.dtype).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly better tokens
        drop = (mass_before >= p) & (p < 1.0)  # keep the smallest set of top tokens whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))

    probs = logits.softmax(dim=-1)
    min_p = [r.params.min_p for r in rows]
    if max(min_p) > 0.0:
        threshold = torch.tensor(min_p, device=device, dtype=probs.dtype).unsqueeze(1) * probs.amax(1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
