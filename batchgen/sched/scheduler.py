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
from batchgen.request import Request, RequestStatus
from batchgen.sched.output import ModelOutput, ScheduledRequest, SchedulerOutput


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    admission_window: int = 512  # waiting requests considered per step for longest-prefix-first admission


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        preempted = False

        # Running requests: decodes first, then prefills still in progress.
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for req in decodes + prefills:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                # The newest running request not already given work this step makes room; when
                # there is none, req itself waits.
                planned = {id(r) for r, _ in plan}
                victim = next((r for r in reversed(self.running) if id(r) not in planned), req)
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                plan.append((req, n))
                budget -= n

        # After a preemption the pool is tight: admitting more would only thrash.
        if self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            self._admit(budget, plan)

        plan.sort(key=lambda p: p[1] != 1)  # one-token rows first: they share one batched attention
        scheduled = [
            ScheduledRequest(
                request_id=req.request_id,
                token_ids=req.token_ids[req.num_computed_tokens:req.num_computed_tokens + n],
                start_pos=req.num_computed_tokens,
                block_ids=req.block_ids,
                sample=req.num_computed_tokens + n == req.num_tokens,
                params=req.params,
                seed=req.seed,
                num_output_tokens=req.num_output_tokens,
                stop_ids=req.stop_ids,
            )
            for req, n in plan
        ]
        self._plan = plan
        out = SchedulerOutput(scheduled, self._finished_ids)
        self._finished_ids = []
        return out

    def _admit(self, budget: int, plan: list[tuple[Request, int]]) -> None:
        """Admit waiting requests from a window at the head of the queue, longest cached prefix
        first, while budget, sequence slots and blocks last. A request whose next uncached block is
        being computed by another request right now waits for it (it will hit the cache next step)
        instead of computing the same prefix twice in one batch."""
        bs = self.kv.block_size
        window = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.config.admission_window))]
        matched = [(req, self.kv.match_prefix(req) if req.num_computed_tokens == 0 else []) for req in window]
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
            if admitted and hits:
                hits = self.kv.match_prefix(req)  # admissions before it may have evicted some
            key = self._next_block_key(req, len(hits)) if sharing else None
            if key is not None and key in in_progress:
                continue  # follow the request computing this prefix
            remaining = req.num_tokens - req.num_computed_tokens - len(hits) * bs
            n = min(remaining, budget)
            if not self.kv.allocate(req, n, hits):
                break
            if key is not None:
                in_progress.add(key)
            admitted.add(id(req))
            if not req.admitted:
                req.admitted = True
                req.num_cached_tokens = len(hits) * bs
                self.num_prompt_tokens += req.num_prompt_tokens
                self.num_cached_prompt_tokens += req.num_cached_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed([r for r in window if id(r) not in admitted]))

    def _next_block_key(self, req: Request, num_blocks: int) -> tuple | None:
        """(adapter, tokens through block num_blocks) when that block lies inside the tokens to compute."""
        end = (num_blocks + 1) * self.kv.block_size
        if end > req.num_tokens - 1:
            return None
        return req.lora, tuple(req.token_ids[:end])

    def update(self, sched: SchedulerOutput, out: ModelOutput) -> list[Request]:
        """Advance the scheduled requests by the computed tokens and the sampled ones; return the
        requests that finished."""
        finished: list[Request] = []
        sampled = iter(zip(out.token_ids, out.logprobs))
        for req, n in self._plan:
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk short of the end samples nothing
            token, logprobs = next(sampled)
            req.token_ids.append(token)
            if req.logprobs is not None:
                req.logprobs.append(logprobs)
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        self._plan = []
        return finished

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if token in req.stop_ids:  # the sampler suppresses them until min_tokens are out
            if token in p.stop_token_ids:
                req.stop_reason = token
            return "stop"
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
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._finished_ids.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
