"""The sparse logits processors (batchgen.exec.penalties) against a dense torch reference written
from the definitions, over a simulated run: random logits and histories with repeated tokens, rows
joining and finishing (their slots reused), rows without processors in the batch, rows skipping a
step (two tokens gained at once); and the sampler's greedy path (no fp32 copy of the logits) against
argmax of the reference's fp32 logits, with bf16 logits full of ties.
"""

from __future__ import annotations

import random

import torch

from batchgen.exec.penalties import LogitsProcessors
from batchgen.exec.sampler import Sampler
from batchgen.sampling import SamplingParams
from batchgen.sched.output import ScheduledRequest

VOCAB = 300


def dense_reference(logits: torch.Tensor, reqs: list[dict]) -> torch.Tensor:
    """logits [rows, vocab] fp32; each req: prompt, output, params, words. The definitions, one row
    at a time, over the whole vocabulary."""
    out = logits.clone()
    for i, q in enumerate(reqs):
        p: SamplingParams = q["params"]
        if not p.uses_logits_processors:
            continue
        x = out[i]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(VOCAB, dtype=torch.bool)
            seen[q["prompt"] + q["output"]] = True
            r = torch.tensor([p.repetition_penalty])
            x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        counts = torch.bincount(torch.tensor(q["output"], dtype=torch.long), minlength=VOCAB).float()
        x = x - ((counts > 0).float() * p.presence_penalty + counts * p.frequency_penalty)
        bias = torch.zeros(VOCAB)
        if p.allowed_token_ids is not None:
            bias[:] = float("-inf")
            bias[p.allowed_token_ids] = 0.0
        for t, b in (p.logit_bias or {}).items():
            bias[t] += b
        for w in q["words"]:
            if len(w) == 1:
                bias[w[0]] = float("-inf")
        x = x + bias
        for w in q["words"]:
            if len(w) > 1 and len(q["output"]) >= len(w) - 1 and q["output"][len(q["output"]) - len(w) + 1:] == w[:-1]:
                x[w[-1]] = float("-inf")
        out[i] = x
    return out


def _params(rng: random.Random) -> tuple[SamplingParams, list[list[int]]]:
    kind = rng.choice(["plain", "rep", "presfreq", "all", "bias", "allowed", "words", "mixed"])
    kw: dict = {}
    words: list[list[int]] = []
    if kind in ("rep", "all", "mixed"):
        kw["repetition_penalty"] = rng.choice([1.3, 0.8])
    if kind in ("presfreq", "all", "mixed"):
        kw["presence_penalty"], kw["frequency_penalty"] = rng.choice([0.5, -0.7]), rng.choice([0.5, 1.25])
    if kind in ("bias", "mixed", "allowed"):
        kw["logit_bias"] = {rng.randrange(40): rng.choice([-3.0, 1.0, 2.5, 100.0]) for _ in range(rng.randint(1, 4))}
    if kind == "allowed":
        kw["allowed_token_ids"] = sorted({rng.randrange(40) for _ in range(8)})
    if kind in ("words", "mixed"):
        words = [[rng.randrange(40)], [rng.randrange(40), rng.randrange(40)]]
        kw["bad_words"] = ["w"]
    p = SamplingParams(temperature=0, **kw)
    if words:
        p.bad_words_token_ids = words
    return p, words


def _scheduled(rid: str, q: dict) -> ScheduledRequest:
    tokens = q["prompt"] + q["output"]
    return ScheduledRequest(rid, tokens[-1:], len(tokens) - 1, [], True, q["params"], None, len(q["output"]),
                            all_token_ids=tokens)


def _simulate(seed: int, steps: int, check) -> None:
    """Runs requests through `steps` steps; check(rids, reqs, scheduled rows) compares one step."""
    rng = random.Random(seed)
    live: dict[str, dict] = {}
    finished: list[str] = []
    n = 0
    for step in range(steps):
        while len(live) < 6 or (rng.random() < 0.3 and len(live) < 10):  # rows join
            p, words = _params(rng)
            live[f"r{n}"] = dict(prompt=[rng.randrange(40) for _ in range(rng.randint(1, 20))], output=[],
                                 params=p, words=words)
            n += 1
        rids = [rid for rid in live if rng.random() < 0.85] or list(live)  # some rows skip this step
        if step % 3:
            rng.shuffle(rids)
        check(rids, [live[rid] for rid in rids], [_scheduled(rid, live[rid]) for rid in rids], finished)
        finished = []
        for rid in rids:  # each scheduled row gains a token: few distinct ones, so repeats are common
            live[rid]["output"].append(rng.randrange(40) if rng.random() < 0.9 else rng.randrange(VOCAB))
        for rid in list(live):
            if rng.random() < 0.12:  # finishes: its slot is reused
                del live[rid]
                finished.append(rid)


def test_sparse_processors_equal_the_dense_definition():
    proc = LogitsProcessors(torch.device("cpu"))
    proc.min_width = 2  # the tables grow (new columns are pads) many times
    gen = torch.Generator().manual_seed(0)
    compared = []

    def check(rids, reqs, rows, finished):
        proc.forget(finished)
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
        expect = dense_reference(logits, reqs)
        got = proc.apply(logits.clone(), rows)
        assert torch.equal(got, expect), [r.params for r in rows]
        compared.append(sum(r.params.uses_logits_processors for r in rows))

    _simulate(1, 60, check)
    assert sum(compared) > 200
    assert proc.slots <= 16  # finished rows' slots were reused
    assert proc.ids.shape[1] >= 16


def test_greedy_without_fp32_copy_is_argmax_of_the_processed_logits():
    """bf16 logits on a coarse grid: many exact ties, among entries and between an entry and the rest."""
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    fast, ties = [], []

    def check(rids, reqs, rows, finished):
        sampler.forget(finished)
        logits = (torch.randint(-6, 2, (len(rows), VOCAB), generator=gen) * 0.5).bfloat16()
        processed = dense_reference(logits.float(), reqs)
        expect = processed.argmax(dim=-1).tolist()
        step_is_dense = any(r.params.allowed_token_ids is not None for r in rows)  # the fp32 path
        tokens, _ = sampler(logits, rows)
        assert tokens == expect
        fast.append(not step_is_dense)
        at_max = processed == processed.amax(dim=1, keepdim=True)
        changed = processed != logits.float()
        ties.append(int(((at_max & changed).any(1) & (at_max & ~changed).any(1)).sum()) if not step_is_dense else 0)

    _simulate(2, 60, check)
    assert sum(fast) > 10
    assert sum(ties) >= 3  # a changed token ties with an unchanged one: the tie rule is under test
