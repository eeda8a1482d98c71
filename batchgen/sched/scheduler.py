"""Continuous batching under a token budget (pure Python, no torch).

Every step gives each request some of the tokens it has not computed yet: the whole remaining
prompt or a chunk of it, or the one token a decode needs. Running requests come first (decodes,
then unfinished prefills), waiting requests fill the rest of the budget. When the KV pool runs dry
the newest running request is preempted: its blocks are freed and it recomputes later (the prefix
cache usually gives most of it back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batchgen.cache.kv_manager import KVCacheManager
from batchgen.lora.slots import LoRASlots
from batchgen.request import Request, RequestStatus
from batchgen.sched.output import ModelOutput, ScheduledRequest, SchedulerOutput


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_speculative_tokens: int = 0  # proposals verified per decode step; 0: no speculation
    spec_max_batch_size: int = 32  # speculation pauses above this many running requests
    admission_window: int = 512  # waiting requests considered per step for longest-prefix-first admission


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lora_slots: LoRASlots | None = None):
        self.config = config
        self.kv = kv
        # LoRA: a running request pins its adapter's device slot; None: adapters take no slot (-1)
        self.lora_slots = lora_slots
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        k = config.num_speculative_tokens
        self.spec_stats = dict(steps=0, proposed=0, accepted=0, proposed_at=[0] * k, accepted_at=[0] * k)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int, int]] = []  # (request, tokens to compute, of which proposals)
        preempted = False
        speculate = 0 < len(self.running) <= self.config.spec_max_batch_size

        # Running requests: decodes first, then prefills still in progress.
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for req in decodes + prefills:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            remaining = req.num_tokens - req.num_computed_tokens
            spec = min(self._num_spec(req), budget - 1) if speculate and remaining == 1 else 0
            n = min(remaining + spec, budget)
            while not self.kv.allocate(req, n):
                # The newest running request not already given work this step makes room; when
                # there is none, req itself waits.
                planned = {id(r) for r, _, _ in plan}
                victim = next((r for r in reversed(self.running) if id(r) not in planned), req)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                plan.append((req, n, spec))
                budget -= n

        # After a preemption the pool is tight: admitting more would only thrash.
        if self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            self._admit(budget, plan)

        # One-token rows first: they share one batched attention; within each part, rows of the
        # same LoRA slot side by side (one segment per adapter for the LoRA kernels).
        plan.sort(key=lambda p: (p[1] != 1, self._lora_slot(p[0])))
        scheduled = [
            ScheduledRequest(
                request_id=req.request_id,
                token_ids=req.token_ids[req.num_computed_tokens:req.num_computed_tokens + n - spec],
                start_pos=req.num_computed_tokens,
                block_ids=req.block_ids,
                sample=req.num_computed_tokens + n - spec == req.num_tokens,
                params=req.params,
                seed=req.seed,
                num_output_tokens=req.num_output_tokens,
                stop_ids=req.stop_ids,
                num_spec=spec,
                all_token_ids=req.token_ids if spec or req.params.uses_logits_processors
                or req.params.prompt_logprobs is not None else None,
                lora_slot=self._lora_slot(req),
                forced_token=req.budget.forced_token() if req.budget is not None else None,
            )
            for req, n, spec in plan
        ]
        self._plan = plan
        out = SchedulerOutput(scheduled, self._finished_ids,
                              lora_loads=self.lora_slots.take_loads() if self.lora_slots else [])
        self._finished_ids = []
        return out

    def _num_spec(self, req: Request) -> int:
        """Proposals worth verifying for a decoding request: never past max_tokens or max_model_len,
        none while min_tokens suppresses stop tokens, when per-token logprobs are asked for, for rows
        with logits processors (penalties, biases, bans) or a thinking budget, or for structured outputs
        (proposals are not checked against the grammar: those rows decode plainly)."""
        k = self.config.num_speculative_tokens
        p = req.params
        if not k or p.logprobs is not None or req.num_output_tokens < p.min_tokens or p.uses_logits_processors \
                or req.budget is not None:
            return 0
        if p.structured_outputs is not None:
            return 0
        room = self.config.max_model_len - req.num_tokens - 1
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - req.num_output_tokens - 1)
        return max(0, min(k, room))

    def _admit(self, budget: int, plan: list[tuple[Request, int, int]]) -> None:
        """Admit waiting requests from a window at the head of the queue, longest cached prefix
        first, while budget, sequence slots and blocks last. A request whose next uncached block is
        being computed by another request right now waits for it (it will hit the cache next step)
        instead of computing the same prefix twice in one batch."""
        bs = self.kv.block_size
        window = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.config.admission_window))]
        # prompt_logprobs needs logits at every prompt position: such requests recompute their prefix
        # (as vLLM does) instead of reusing cached blocks, which have no logits.
        matched = [(req, self.kv.match_prefix(req) if req.num_computed_tokens == 0
                    and req.params.prompt_logprobs is None else []) for req in window]
        sharing = self.kv.radix is not None
        if sharing:
            matched.sort(key=lambda m: -len(m[1]))  # stable: the queue's order among equals
        # Blocks some running request is computing now, keyed by the whole prefix they complete.
        in_progress = {self._next_block_key(r, r.num_computed_tokens // bs) for r in self.running
                       if r.num_tokens - r.num_computed_tokens > 1} if sharing else set()
        admitted: set[int] = set()
        for req, hits in matched:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not req.grammar_ready:
                continue  # its grammar is still compiling: the others go ahead
            if admitted and hits and req.params.prompt_logprobs is None:
                hits = self.kv.match_prefix(req)  # admissions before it may have evicted some
            key = self._next_block_key(req, len(hits)) if sharing else None
            if key is not None and key in in_progress:
                continue  # follow the request computing this prefix
            uses_slot = req.lora is not None and self.lora_slots is not None
            if uses_slot and not self.lora_slots.can_acquire(req.lora):
                continue  # every LoRA slot is pinned by running requests of other adapters
            remaining = req.num_tokens - req.num_computed_tokens - len(hits) * bs
            n = min(remaining, budget)
            if not self.kv.allocate(req, n, hits):
                break
            if key is not None:
                in_progress.add(key)
            admitted.add(id(req))
            if uses_slot:
                self.lora_slots.acquire(req.lora)
            if not req.admitted:
                req.admitted = True
                req.num_cached_tokens = len(hits) * bs
                self.num_prompt_tokens += req.num_prompt_tokens
                self.num_cached_prompt_tokens += req.num_cached_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.append((req, n, 0))
            budget -= n
        self.waiting.extendleft(reversed([r for r in window if id(r) not in admitted]))

    def _next_block_key(self, req: Request, num_blocks: int) -> tuple | None:
        """(adapter, tokens through block num_blocks) when that block lies inside the tokens to compute."""
        end = (num_blocks + 1) * self.kv.block_size
        if end > req.num_tokens - 1:
            return None
        return req.lora, tuple(req.token_ids[:end])

    def update(self, sched: SchedulerOutput, out: ModelOutput) -> list[Request]:
        """Advance the scheduled requests by the computed tokens and the sampled ones (accepted
        proposals first); return the requests that finished."""
        finished: list[Request] = []
        i = 0  # index into the sampled rows of `out`
        for req, n, spec in self._plan:
            if out.prompt_logprobs and req.request_id in out.prompt_logprobs:
                _add_prompt_logprobs(req, *out.prompt_logprobs[req.request_id])
            if req.num_computed_tokens + n - spec < req.num_tokens:
                req.num_computed_tokens += n  # a prefill chunk short of the end samples nothing
                self.kv.cache_full_blocks(req)
                continue
            token, logprobs = out.token_ids[i], out.logprobs[i]
            accepted = out.accepted[i] if out.accepted is not None else []
            if spec:
                self._count_spec(out.num_proposed[i], len(accepted))
            i += 1
            # KV is valid for the last known token and the accepted proposals; what the target
            # computed for rejected ones is dropped with the blocks past the new length.
            req.num_computed_tokens = req.num_tokens + len(accepted)
            reason = None
            for t in accepted + [token]:
                req.token_ids.append(t)
                if req.logprobs is not None:
                    req.logprobs.append(logprobs)
                if req.budget is not None:
                    req.budget.observe(req.token_ids)
                reason = self._stop_reason(req, t)
                if reason is not None:
                    break
            if spec:
                self.kv.trim(req)
            self.kv.cache_full_blocks(req)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        self._plan = []
        return finished

    def _count_spec(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return  # the proposer found nothing: a plain decode step
        st = self.spec_stats
        st["steps"] += 1
        st["proposed"] += proposed
        st["accepted"] += accepted
        for j in range(proposed):
            st["proposed_at"][j] += 1
        for j in range(accepted):
            st["accepted_at"][j] += 1

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in req.stop_ids:  # the sampler suppresses them until min_tokens are out
            if token in p.stop_token_ids:
                req.stop_reason = token
            return "stop"
        if req.repetition is not None and req.repetition.observe(req.token_ids, req.num_prompt_tokens):
            return "repetition"
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return "length"
        if req.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def finish(self, req: Request, reason: str) -> None:
        """End a request (also from outside: stop strings, aborts) and free its blocks at once."""
        if req.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release_lora(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._finished_ids.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release_lora(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _lora_slot(self, req: Request) -> int:
        """Device slot of a running request's adapter (pinned since admission); -1 for the base model."""
        if req.lora is None or self.lora_slots is None:
            return -1
        return self.lora_slots.slot(req.lora)

    def _release_lora(self, req: Request) -> None:
        if req.lora is not None and self.lora_slots is not None:
            self.lora_slots.release(req.lora)


def _add_prompt_logprobs(req: Request, first: int, entries: list) -> None:
    """Append a chunk's prompt logprobs; a recompute after preemption scores tokens again: skip those."""
    have = len(req.prompt_logprobs)
    if first + len(entries) > have:
        req.prompt_logprobs.extend(entries[have - first:])
