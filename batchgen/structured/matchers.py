"""Per-sequence grammar state: waiting for a compile, then a matcher that masks and advances.

Each step the runner calls prepare() with the rows it samples, right after launching the forward:
on CUDA the forward runs asynchronously, so the CPU fills the bitmask of the constrained rows into
buffers allocated once (pinned, copied to the device without blocking) while the GPU computes. The
sampler's first act is apply(), which sets every token the grammar forbids to -inf for the
constrained rows only (unconstrained rows are not touched). After the step the engine feeds each
matcher the tokens its sequence gained (advance()); tokens a preempted sequence recomputes are
not new, so they are never fed twice.
"""

from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import xgrammar as xgr

from batchgen.request import Request
from batchgen.sched.output import ScheduledRequest
from batchgen.structured.grammar import GrammarCompilerPool, build_tokenizer_info


@dataclass
class _Waiting:
    request: Request
    future: Future
    deadline: float  # time.monotonic() past which the compile counts as timed out


class StructuredState:
    def __init__(self, tokenizer, vocab_width: int, stop_token_ids: list[int], device: torch.device,
                 max_rows: int, compile_timeout: float, compile_workers: int = 2):
        self.vocab_width = vocab_width
        self.stop_token_ids = list(stop_token_ids)
        self.compile_timeout = compile_timeout
        self.compilers = GrammarCompilerPool(build_tokenizer_info(tokenizer, vocab_width, stop_token_ids),
                                             max_workers=compile_workers)
        self.device = device
        self.waiting: dict[str, _Waiting] = {}  # by request id
        self.matchers: dict[str, xgr.GrammarMatcher] = {}  # by request id: ready sequences
        self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=compile_workers)
        words = xgr.get_bitmask_shape(1, vocab_width)[1]
        # Allocated once: [max_rows, ceil(vocab / 32)] int32, one bit per token (1: allowed).
        self._host = torch.empty((max_rows, words), dtype=torch.int32, pin_memory=device.type == "cuda")
        self._device = self._host if device.type == "cpu" else torch.empty_like(self._host, device=device)
        self._prepared: dict[str, int] | None = None  # request id -> buffer row, for this step's sampler
        self.num_masked_rows = 0

    # ---- compile ---------------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Start (or join) the compile of req's grammar; the scheduler skips req until it is ready."""
        future = self.compilers.submit(req.params.structured_outputs)
        req.grammar_ready = False
        self.waiting[req.request_id] = _Waiting(req, future, time.monotonic() + self.compile_timeout)

    def poll(self) -> list[tuple[Request, str]]:
        """Give each request whose compile finished its matcher; return (request, error) for those
        whose compile failed or ran past the timeout."""
        failed = []
        now = time.monotonic()
        for rid, w in list(self.waiting.items()):
            if w.future.done():
                del self.waiting[rid]
                error = w.future.exception()
                if error is not None:
                    failed.append((w.request, str(error)))
                    continue
                grammar, finished_at = w.future.result()
                if finished_at > w.deadline:  # done by now, but it ran past the request's deadline
                    failed.append((w.request, self._timeout_message(w.request)))
                    continue
                self.matchers[rid] = xgr.GrammarMatcher(grammar, override_stop_tokens=self.stop_token_ids)
                w.request.grammar_ready = True
            elif now > w.deadline:
                del self.waiting[rid]  # the compile goes on in its thread; its grammar stays cached
                failed.append((w.request, self._timeout_message(w.request)))
        return failed

    def _timeout_message(self, req: Request) -> str:
        return (f"structured_outputs: compiling the {req.params.structured_outputs.kind} grammar took longer "
                f"than {self.compile_timeout:g}s (engine.structured_outputs_compile_timeout)")

    def wait(self, timeout: float) -> None:
        """Block until some compile finishes (nothing else can run), at most `timeout` seconds."""
        futures = [w.future for w in self.waiting.values()]
        if futures:
            soonest = min(w.deadline for w in self.waiting.values()) - time.monotonic()
            concurrent.futures.wait(futures, timeout=max(0.0, min(timeout, soonest)),
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def forget(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        self.matchers.pop(request_id, None)

    # ---- each step ---------------------------------------------------------------------------------

    def prepare(self, rows: list[ScheduledRequest]) -> None:
        """Fill the bitmask of the constrained rows among `rows` (those about to be sampled)."""
        ids = [r.request_id for r in rows if r.request_id in self.matchers]
        self._prepared = {rid: j for j, rid in enumerate(ids)}
        if not ids:
            return
        if len(ids) > self._host.shape[0]:  # more rows than max_num_seqs: only direct Sampler use
            self._host = torch.empty((len(ids), self._host.shape[1]), dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
            self._device = self._host if self.device.type == "cpu" else torch.empty_like(self._host, device=self.device)
        host = self._host[:len(ids)]
        matchers = [self.matchers[rid] for rid in ids]
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(host, 0)
        else:  # xgrammar's threads fill the rows in parallel
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, host)
        if self._device is not self._host:
            self._device[:len(ids)].copy_(host, non_blocking=True)

    def apply(self, logits: torch.Tensor, rows: list[ScheduledRequest]) -> torch.Tensor:
        """logits: [rows, vocab_width]. Forbidden tokens of the constrained rows become -inf, in place."""
        if self._prepared is None:  # a caller that did not prepare (the sampler used on its own)
            self.prepare(rows)
        prepared, self._prepared = self._prepared, None
        pairs = [(i, prepared[r.request_id]) for i, r in enumerate(rows) if r.request_id in prepared]
        if not pairs:
            return logits
        row_ids, mask_ids = [i for i, _ in pairs], [j for _, j in pairs]
        words = self._device[mask_ids]  # [k, words], in logits-row order
        if row_ids == list(range(logits.shape[0])):  # every row constrained: mask in place, no gather
            xgr.apply_token_bitmask_inplace(logits, words)
        else:
            row_idx = torch.tensor(row_ids, device=logits.device)
            constrained = logits[row_idx]  # [k, vocab]
            xgr.apply_token_bitmask_inplace(constrained, words)
            logits[row_idx] = constrained
        self.num_masked_rows += len(pairs)
        return logits

    def advance(self, req: Request, tokens: list[int]) -> bool:
        """Feed the sequence's new tokens to its matcher; True when the grammar has terminated."""
        matcher = self.matchers.get(req.request_id)
        if matcher is None:
            return False
        for token in tokens:
            if matcher.is_terminated():
                return True
            if not matcher.accept_token(token):
                raise RuntimeError(f"request {req.request_id!r}: token {token} was sampled outside its grammar "
                                   "(the bitmask was not applied to its logits)")
        return matcher.is_terminated()

    def stats(self) -> dict:
        c = self.compilers
        return dict(structured_compiles=c.misses, structured_cache_hits=c.hits,
                    structured_waiting=len(self.waiting), structured_masked_rows=self.num_masked_rows)

    def close(self) -> None:
        self.compilers.close()
