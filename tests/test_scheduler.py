"""Scheduler + KV cache manager without a model (pure Python, no torch).

A fake runner answers every SchedulerOutput with one deterministic token per sampled row, and keeps a
shadow of the KV pool (block, offset) -> token so that every step can check that the context a row
reads from its block table is exactly its own token sequence (no lost, shared-while-written or
overwritten blocks under chunking, prefix hits and preemption).
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from batchgen.cache.kv_manager import KVCacheManager
from batchgen.request import Request, RequestStatus
from batchgen.sampling import SamplingParams
from batchgen.sched.output import ModelOutput, SchedulerOutput
from batchgen.sched.scheduler import Scheduler, SchedulerConfig

EOS = 2


def fake_token(request_id: str, pos: int) -> int:
    """The token the fake model 'samples' at position pos: deterministic, never EOS, in [10, 60)."""
    return 10 + (sum(map(ord, request_id)) * 31 + pos * 7) % 50


class Driver:
    def __init__(self, num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=64,
                 max_model_len=256, prefix_caching=True, token_fn=fake_token):
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len), self.kv)
        self.config = self.sched.config
        self.bs = block_size
        self.token_fn = token_fn
        self.reqs: dict[str, Request] = {}
        self.slots: dict[tuple[int, int], int] = {}  # shadow KV: (block, offset) -> token
        self.steps: list[SchedulerOutput] = []
        self.finished: list[Request] = []

    def add(self, rid: str, prompt: list[int], lora=None, **params) -> Request:
        params.setdefault("ignore_eos", False)
        req = Request(rid, prompt, SamplingParams(**params), [EOS], lora=lora)
        self.reqs[rid] = req
        self.sched.add(req)
        return req

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        out = self.sched.schedule()
        assert out.scheduled, f"no progress: running={self.sched.running} waiting={list(self.sched.waiting)}"
        self._check_step(out)
        tokens = []
        for row in out.scheduled:
            req = self.reqs[row.request_id]
            for j, tok in enumerate(row.token_ids):  # "compute": write the chunk's KV
                pos = row.start_pos + j
                self.slots[(row.block_ids[pos // self.bs], pos % self.bs)] = tok
            if row.sample:
                tokens.append(self.token_fn(row.request_id, row.start_pos + row.num_tokens))
            assert req.token_ids[row.start_pos:row.start_pos + row.num_tokens] == row.token_ids
        finished = self.sched.update(out, ModelOutput(tokens, [None] * len(tokens)))
        self.steps.append(out)
        self.finished += finished
        return out, finished

    def _check_step(self, out: SchedulerOutput) -> None:
        assert out.num_tokens <= self.config.max_num_batched_tokens, "token budget exceeded"
        assert len(out.scheduled) <= self.config.max_num_seqs, "max_num_seqs exceeded"
        assert len(self.sched.running) <= self.config.max_num_seqs
        ids = [r.request_id for r in out.scheduled]
        assert len(ids) == len(set(ids)), f"a request scheduled twice in one step: {ids}"
        lens = [r.num_tokens for r in out.scheduled]
        assert lens == sorted(lens, key=lambda n: n != 1), f"one-token rows must come first: {lens}"
        written: set[int] = set()
        for row in out.scheduled:
            req = self.reqs[row.request_id]
            assert req.status is RequestStatus.RUNNING, f"{req} scheduled but not running"
            assert row.num_tokens >= 1
            end = row.start_pos + row.num_tokens
            assert row.sample == (end == req.num_tokens)
            assert len(row.block_ids) * self.bs >= end, "block table too short for the chunk"
            # The context read from the block table is the request's own tokens.
            for pos in range(row.start_pos):
                key = (row.block_ids[pos // self.bs], pos % self.bs)
                assert self.slots.get(key) == req.token_ids[pos], f"{req.request_id}: KV at {pos} is wrong"
            # Blocks written this step belong to this request alone and are not in the prefix cache.
            for b in {row.block_ids[pos // self.bs] for pos in range(row.start_pos, end)}:
                assert self.kv.pool.ref_cnt[b] == 1, f"block {b} written while shared"
                assert self.kv.radix is None or not self.kv.radix.is_cached(b), f"cached block {b} overwritten"
                assert b not in written, f"block {b} written by two rows in one step"
                written.add(b)

    def run(self, max_steps=10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")

    def assert_all_blocks_free(self) -> None:
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert all(c == 0 for c in self.kv.pool.ref_cnt)
        assert not self.sched.running and not self.sched.waiting


def prompt(n: int, seed: int, lo: int = 100, hi: int = 400) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(lo, hi) for _ in range(n)]


def expected_output(rid: str, prompt_len: int, n: int) -> list[int]:
    return [fake_token(rid, prompt_len + i) for i in range(n)]


# ---- budget, max_num_seqs, order ---------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_budget_and_max_num_seqs_respected(prefix_caching):
    d = Driver(num_blocks=200, max_num_seqs=5, max_num_batched_tokens=40, prefix_caching=prefix_caching)
    rng = random.Random(1)
    for i in range(20):
        d.add(f"r{i}", prompt(rng.randint(1, 90), seed=i), max_tokens=rng.randint(1, 12))
    d.run()
    assert len(d.finished) == 20
    assert max(len(s.scheduled) for s in d.steps) == 5  # the limit is reached, never passed
    assert max(s.num_tokens for s in d.steps) == 40
    for rid, req in d.reqs.items():
        assert req.finish_reason == "length"
        assert req.output_token_ids == expected_output(rid, req.num_prompt_tokens, req.params.max_tokens)
    d.assert_all_blocks_free()


def test_running_decodes_get_budget_before_new_prefills():
    d = Driver(max_num_batched_tokens=8)
    for i in range(4):
        d.add(f"d{i}", prompt(2, seed=i), max_tokens=10)
    out, _ = d.step()
    assert [r.num_tokens for r in out.scheduled] == [2, 2, 2, 2]
    d.add("long", prompt(40, seed=99), max_tokens=2)
    for _ in range(3):
        out, _ = d.step()
        # four decodes first, then whatever budget is left goes to the new prompt
        assert [(r.request_id, r.num_tokens) for r in out.scheduled] == [
            ("d0", 1), ("d1", 1), ("d2", 1), ("d3", 1), ("long", 4)]
        assert all(r.sample for r in out.scheduled[:4]) and not out.scheduled[4].sample
    d.run()
    d.assert_all_blocks_free()


def test_running_prefill_before_waiting_requests():
    d = Driver(max_num_batched_tokens=16)
    d.add("a", prompt(40, seed=1), max_tokens=2)
    d.add("b", prompt(10, seed=2), max_tokens=2)
    chunks = []
    while not d.reqs["a"].output_token_ids:
        out, _ = d.step()
        chunks.append([(r.request_id, r.num_tokens) for r in out.scheduled])
    # b waits until a's prefill is done and then takes what is left of that step's budget
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8), ("b", 8)]]
    d.run()
    d.assert_all_blocks_free()


def test_chunked_prefill_of_long_prompt():
    d = Driver(max_num_batched_tokens=32)
    p = prompt(100, seed=3)
    req = d.add("long", p, max_tokens=3)
    rows = []
    d.run()
    for s in d.steps:
        assert len(s.scheduled) == 1
        rows.append((s.scheduled[0].start_pos, s.scheduled[0].num_tokens, s.scheduled[0].sample))
    assert rows == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True), (100, 1, True), (101, 1, True)]
    assert req.output_token_ids == expected_output("long", 100, 3)
    assert req.num_prompt_tokens == 100 and req.finish_reason == "length"
    d.assert_all_blocks_free()


# ---- preemption --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_newest_first_and_everything_completes(prefix_caching):
    # 3 requests of 6 + 14 tokens need 5 blocks of 4 each; 8 blocks cannot hold them all.
    d = Driver(num_blocks=8, block_size=4, max_num_batched_tokens=64, max_model_len=32,
               prefix_caching=prefix_caching)
    for i in range(3):
        d.add(f"r{i}", prompt(6, seed=10 + i), max_tokens=14)
    preempted_ids = []
    while d.sched.has_unfinished():
        before = [r.request_id for r in d.sched.running]
        before_preemptions = d.sched.num_preemptions
        d.step()
        running_now = {r.request_id for r in d.sched.running} | {r.request_id for r in d.finished}
        victims = [rid for rid in before if rid not in running_now]
        assert len(victims) == d.sched.num_preemptions - before_preemptions
        if victims:
            # the victims are the newest running requests: a tail of the running order
            assert before[len(before) - len(victims):] == victims, (before, victims)
            for rid in victims:
                assert d.reqs[rid].status is RequestStatus.WAITING and d.reqs[rid].num_computed_tokens == 0
                assert d.reqs[rid].block_ids == []
            preempted_ids += victims
    assert d.sched.num_preemptions > 0 and preempted_ids
    assert sorted(r.request_id for r in d.finished) == ["r0", "r1", "r2"]  # no lost request, none twice
    for rid, req in d.reqs.items():
        assert req.output_token_ids == expected_output(rid, 6, 14), f"{rid} lost or changed tokens"
        assert req.finish_reason == "length"
    d.assert_all_blocks_free()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_random_workload_all_blocks_return(prefix_caching):
    rng = random.Random(5)
    d = Driver(num_blocks=24, block_size=8, max_num_seqs=6, max_num_batched_tokens=48, max_model_len=128,
               prefix_caching=prefix_caching)
    base = prompt(40, seed=0)
    for i in range(25):
        p = base[:rng.randint(0, 40)] + prompt(rng.randint(1, 30), seed=100 + i)
        d.add(f"q{i}", p, max_tokens=rng.randint(1, 40))
    d.run()
    assert d.sched.num_preemptions > 0
    assert len(d.finished) == 25 and len({r.request_id for r in d.finished}) == 25
    for rid, req in d.reqs.items():
        assert req.output_token_ids == expected_output(rid, req.num_prompt_tokens, req.params.max_tokens)
    d.assert_all_blocks_free()
    if prefix_caching:
        assert d.sched.num_cached_prompt_tokens > 0


# ---- stop conditions ---------------------------------------------------------------------------


def test_stop_on_max_tokens():
    d = Driver()
    req = d.add("a", prompt(5, seed=1), max_tokens=7)
    d.run()
    assert req.num_output_tokens == 7 and req.finish_reason == "length" and req.stop_reason is None
    d.assert_all_blocks_free()


def _constant_tokens(seq):
    it = iter(seq)
    return lambda rid, pos: next(it)


def test_stop_on_stop_token_ids():
    d = Driver(token_fn=_constant_tokens([11, 12, 13, 77, 14, 15]))
    req = d.add("a", prompt(5, seed=1), max_tokens=20, stop_token_ids=[77])
    d.run()
    assert req.output_token_ids == [11, 12, 13, 77]
    assert req.finish_reason == "stop" and req.stop_reason == 77
    d.assert_all_blocks_free()


def test_stop_on_eos_unless_ignore_eos():
    d = Driver(token_fn=_constant_tokens([11, EOS, 12, 13]))
    req = d.add("a", prompt(5, seed=1), max_tokens=4)
    d.run()
    assert req.output_token_ids == [11, EOS]
    assert req.finish_reason == "stop" and req.stop_reason is None  # EOS is not a stop_token_id

    d = Driver(token_fn=_constant_tokens([11, EOS, 12, 13]))
    req = d.add("a", prompt(5, seed=1), max_tokens=4, ignore_eos=True)
    d.run()
    assert req.output_token_ids == [11, EOS, 12, 13] and req.finish_reason == "length"
    d.assert_all_blocks_free()


def test_stop_on_max_model_len():
    d = Driver(max_model_len=24)
    req = d.add("a", prompt(20, seed=1), max_tokens=None)
    d.run()
    assert req.num_tokens == 24 and req.num_output_tokens == 4 and req.finish_reason == "length"
    d.assert_all_blocks_free()


def test_finish_from_outside_frees_blocks():
    d = Driver(max_num_batched_tokens=8)
    a = d.add("a", prompt(30, seed=1), max_tokens=5)
    b = d.add("b", prompt(3, seed=2), max_tokens=5)
    d.step()
    d.sched.finish(a, "abort")
    d.sched.finish(b, "abort")  # still waiting
    assert a.finish_reason == "abort" and b.finish_reason == "abort"
    assert not d.sched.has_unfinished()
    d.assert_all_blocks_free()
    assert sorted(d.sched.schedule().finished_ids) == ["a", "b"]


# ---- prefix cache ------------------------------------------------------------------------------


def test_prefix_hit_after_finished_request():
    d = Driver(block_size=16, max_num_batched_tokens=256)
    shared = prompt(48, seed=7)
    first = d.add("first", shared + prompt(12, seed=8), max_tokens=1)
    d.run()
    assert first.num_cached_tokens == 0
    d.steps.clear()
    second = d.add("second", shared + prompt(20, seed=9), max_tokens=2)
    d.run()
    assert second.num_cached_tokens == 48
    row = d.steps[0].scheduled[0]
    assert (row.start_pos, row.num_tokens) == (48, 20), "only the uncached tail is computed"
    assert row.block_ids[:3] == first_blocks_of(d, shared)
    assert d.sched.num_prompt_tokens == 60 + 68 and d.sched.num_cached_prompt_tokens == 48
    d.assert_all_blocks_free()


def first_blocks_of(d: Driver, tokens: list[int]) -> list[int]:
    probe = Request("probe", tokens + [0], SamplingParams(), [EOS])
    return [n.block for n in d.kv.match_prefix(probe)]


def test_prefix_hit_leaves_one_token_to_compute():
    d = Driver(block_size=16, max_num_batched_tokens=256)
    shared = prompt(48, seed=7)
    d.add("first", shared, max_tokens=2)
    d.run()
    d.steps.clear()
    second = d.add("second", list(shared), max_tokens=2)
    d.run()
    assert second.num_cached_tokens == 32  # the last block is recomputed to have a position to sample
    assert (d.steps[0].scheduled[0].start_pos, d.steps[0].scheduled[0].num_tokens) == (32, 16)
    d.assert_all_blocks_free()


def test_prefix_hit_while_first_request_still_running():
    d = Driver(block_size=16, max_num_batched_tokens=256)
    shared = prompt(32, seed=7)
    first = d.add("first", shared + [5], max_tokens=10)
    d.step()
    second = d.add("second", shared + [6, 7], max_tokens=3)
    d.step()
    assert second.num_cached_tokens == 32
    assert first.block_ids[:2] == second.block_ids[:2]
    assert all(d.kv.pool.ref_cnt[b] == 2 for b in first.block_ids[:2])
    d.run()
    d.assert_all_blocks_free()


def test_no_prefix_hits_when_caching_disabled():
    d = Driver(block_size=16, max_num_batched_tokens=256, prefix_caching=False)
    shared = prompt(48, seed=7)
    d.add("first", shared + [1], max_tokens=1)
    d.run()
    second = d.add("second", shared + [2], max_tokens=1)
    d.run()
    assert second.num_cached_tokens == 0
    d.assert_all_blocks_free()


def test_different_lora_does_not_hit():
    d = Driver(block_size=16, max_num_batched_tokens=256)
    shared = prompt(48, seed=7)
    d.add("first", shared + [1], lora="a", max_tokens=1)
    d.run()
    other = d.add("other", shared + [2], lora="b", max_tokens=1)
    same = d.add("same", shared + [3], lora="a", max_tokens=1)
    d.run()
    assert other.num_cached_tokens == 0 and same.num_cached_tokens == 48
    d.assert_all_blocks_free()


# ---- layering ----------------------------------------------------------------------------------


def test_cache_and_sched_import_no_torch():
    code = ("import sys; import batchgen.sched.scheduler, batchgen.sched.output, batchgen.cache.kv_manager, "
            "batchgen.cache.radix, batchgen.cache.block_pool, batchgen.request, batchgen.sampling; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
