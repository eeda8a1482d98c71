"""Sampler: statistical tests against exact probabilities, seeds, greedy, min_tokens, logprobs.

The expected distributions are computed here, independently of batchgen, from the documented
semantics: temperature -> top-k -> top-p (drop a token when the mass of strictly better tokens is
>= top_p) -> min-p (drop tokens with prob < min_p * max prob) -> renormalise. p-values of the
chi-square goodness-of-fit test come from torch.special.gammaincc (no scipy).
"""

from __future__ import annotations

import math

import pytest
import torch

from batchgen.exec.sampler import Sampler
from batchgen.sampling import SamplingParams
from batchgen.sched.output import ScheduledRequest

LOGITS = [0.3, 2.0, -0.5, 1.0, -1.2, 1.5, 0.0, 0.6]  # distinct, not sorted
VOCAB = len(LOGITS)
N = 20_000


def row(params: SamplingParams, rid: str = "r", seed: int | None = None, num_output_tokens: int = 0,
        stop_ids=()) -> ScheduledRequest:
    return ScheduledRequest(request_id=rid, token_ids=[0], start_pos=0, block_ids=[], sample=True, params=params,
                            seed=seed, num_output_tokens=num_output_tokens, stop_ids=frozenset(stop_ids))


def expected_probs(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, suppressed=()) -> list[float]:
    """The documented semantics, in float64 Python."""
    z = [(-math.inf if i in suppressed else l / temperature) for i, l in enumerate(logits)]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = {i for i in order if z[i] > -math.inf}
    if 0 < top_k < len(z):
        keep &= set(order[:top_k])

    def normalised(kept):
        m = max(z[i] for i in kept)
        w = {i: math.exp(z[i] - m) for i in kept}
        s = sum(w.values())
        return {i: v / s for i, v in w.items()}

    if top_p < 1.0:
        probs = normalised(keep)
        mass_before, kept = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            assert abs(mass_before - top_p) > 1e-4, "test case sits on a top_p boundary"
            if mass_before < top_p:
                kept.add(i)
            mass_before += probs[i]
        keep = kept
    probs = normalised(keep)
    if min_p > 0:
        top = max(probs.values())
        for p in probs.values():
            assert abs(p - min_p * top) > 1e-4, "test case sits on a min_p boundary"
        keep = {i for i, p in probs.items() if p >= min_p * top}
        probs = {i: probs[i] / sum(probs[j] for j in keep) for i in keep}
    return [probs.get(i, 0.0) for i in range(len(logits))]


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    """p-value of Pearson's chi-square goodness of fit over the tokens with probs > 0."""
    n = sum(counts)
    support = [i for i, p in enumerate(probs) if p > 0]
    if len(support) == 1:
        return 1.0
    chi2 = sum((counts[i] - n * probs[i]) ** 2 / (n * probs[i]) for i in support)
    df = len(support) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


def check_distribution(tokens: list[int], probs: list[float], label: str) -> None:
    counts = [0] * VOCAB
    for t in tokens:
        counts[t] += 1
    for i, p in enumerate(probs):
        if p == 0:
            assert counts[i] == 0, f"{label}: filtered-out token {i} sampled {counts[i]} times"
    p_value = chi_square_p(counts, probs)
    assert p_value > 1e-3, f"{label}: chi-square p={p_value:.2e}, counts {counts}, expected {probs}"


CASES = {
    "temperature=1": dict(temperature=1.0),
    "temperature=0.6": dict(temperature=0.6),
    "temperature=1.7": dict(temperature=1.7),
    "top_k=3": dict(top_k=3),
    "top_k=1": dict(top_k=1),
    "top_p=0.6": dict(top_p=0.6),
    "top_p=0.9,T=1.3": dict(top_p=0.9, temperature=1.3),
    "min_p=0.2": dict(min_p=0.2),
    "min_p=0.05,T=0.8": dict(min_p=0.05, temperature=0.8),
    "top_k=5,top_p=0.8": dict(top_k=5, top_p=0.8),
    "all": dict(temperature=0.8, top_k=6, top_p=0.95, min_p=0.08),
    "all,T=2": dict(temperature=2.0, top_k=7, top_p=0.7, min_p=0.3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_exact_probabilities(name):
    kw = CASES[name]
    params = SamplingParams(**kw)
    sampler = Sampler(seed=1234, device=torch.device("cpu"))
    logits = torch.tensor([LOGITS] * N, dtype=torch.float32)
    tokens, _ = sampler(logits, [row(params, rid=f"r{i}") for i in range(N)])
    check_distribution(tokens, expected_probs(LOGITS, **kw), name)


def test_mixed_parameters_in_one_batch():
    """Per-row parameters: interleaved rows of four kinds, each with its own distribution."""
    kinds = [dict(temperature=0.7), dict(top_k=2), dict(top_p=0.5, temperature=1.5), dict(min_p=0.25, top_k=6)]
    rows, per_kind = [], 6000
    for i in range(per_kind * len(kinds)):
        rows.append(row(SamplingParams(**kinds[i % len(kinds)]), rid=f"r{i}"))
    rows.insert(17, row(SamplingParams(temperature=0), rid="greedy"))
    sampler = Sampler(seed=7, device=torch.device("cpu"))
    logits = torch.tensor([LOGITS] * len(rows))
    tokens, _ = sampler(logits, rows)
    assert tokens[17] == max(range(VOCAB), key=lambda i: LOGITS[i])
    del tokens[17]
    for k, kw in enumerate(kinds):
        check_distribution(tokens[k::len(kinds)], expected_probs(LOGITS, **kw), f"mixed {kw}")


def test_seeded_rows_have_the_right_distribution():
    kw = dict(temperature=1.2, top_p=0.85)
    n = 4000
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    rows = [row(SamplingParams(**kw), rid=f"s{i}", seed=i) for i in range(n)]
    tokens, _ = sampler(torch.tensor([LOGITS] * n), rows)
    check_distribution(tokens, expected_probs(LOGITS, **kw), "seeded rows")


# ---- seeds -------------------------------------------------------------------------------------


def _flat_logits(rng: torch.Generator) -> list[float]:
    return (torch.randn(VOCAB, generator=rng) * 0.3).tolist()  # high entropy: draws differ a lot


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0, top_k=6)
    steps = 12
    rng = torch.Generator().manual_seed(0)
    step_logits = [_flat_logits(rng) for _ in range(steps)]

    alone = Sampler(seed=0, device=torch.device("cpu"))
    ref = [alone(torch.tensor([lg]), [row(params, rid="x", seed=42)])[0][0] for lg in step_logits]
    assert len(set(ref)) > 2, "the test needs varied draws"

    crowded = Sampler(seed=99, device=torch.device("cpu"))  # another engine seed
    got = []
    for s, lg in enumerate(step_logits):
        others = [row(SamplingParams(temperature=0.9), rid="u1"),                       # unseeded
                  row(SamplingParams(temperature=1.3, top_p=0.9), rid="y", seed=7),       # other seed
                  row(SamplingParams(temperature=0), rid="g"),                            # greedy
                  row(SamplingParams(min_p=0.1), rid="u2")][:s % 5]
        pos = s % (len(others) + 1)  # the seeded row moves around the batch
        rows = others[:pos] + [row(params, rid="x", seed=42)] + others[pos:]
        logits = torch.tensor([_flat_logits(rng) for _ in others[:pos]] + [lg] + [_flat_logits(rng) for _ in others[pos:]])
        got.append(crowded(logits, rows)[0][pos])
    assert got == ref


def test_unseeded_rows_follow_the_engine_seed():
    params = SamplingParams(temperature=1.0)
    logits = torch.tensor([LOGITS] * 64)
    rows = [row(params, rid=f"r{i}") for i in range(64)]
    a = Sampler(seed=5, device=torch.device("cpu"))(logits.clone(), rows)[0]
    b = Sampler(seed=5, device=torch.device("cpu"))(logits.clone(), rows)[0]
    c = Sampler(seed=6, device=torch.device("cpu"))(logits.clone(), rows)[0]
    assert a == b and a != c


def test_forget_restarts_a_seeded_stream():
    params = SamplingParams(temperature=1.0)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    logits = torch.tensor([[0.0] * VOCAB])
    first = [sampler(logits.clone(), [row(params, rid="x", seed=3)])[0][0] for _ in range(8)]
    sampler.forget(["x"])
    again = [sampler(logits.clone(), [row(params, rid="x", seed=3)])[0][0] for _ in range(8)]
    assert first == again


# ---- greedy, min_tokens, logprobs ---------------------------------------------------------------


def test_greedy_rows_pick_argmax():
    rng = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 32, generator=rng)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=3, top_p=0.2, min_p=0.5),
              SamplingParams(temperature=0, seed=4)]
    rows = [row(params[i % 3], rid=f"r{i}", seed=params[i % 3].seed) for i in range(50)]
    tokens, logprobs = Sampler(seed=0, device=torch.device("cpu"))(logits.clone(), rows)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 50


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_stop_ids(temperature):
    best = max(range(VOCAB), key=lambda i: LOGITS[i])
    second = sorted(range(VOCAB), key=lambda i: -LOGITS[i])[1]
    stop = {best, second} if temperature else {best}
    params = SamplingParams(temperature=temperature, min_tokens=3, max_tokens=10)
    n = 3000
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    early = [row(params, rid=f"e{i}", num_output_tokens=i % 3, stop_ids=stop) for i in range(n)]
    late = [row(params, rid=f"l{i}", num_output_tokens=3 + i % 2, stop_ids=stop) for i in range(n)]
    tokens, _ = sampler(torch.tensor([LOGITS] * (2 * n)), early + late)
    early_tokens, late_tokens = tokens[:n], tokens[n:]
    assert not stop & set(early_tokens), "a stop id was sampled before min_tokens"
    if temperature == 0:
        assert set(early_tokens) == {second} and set(late_tokens) == {best}
    else:
        check_distribution(early_tokens, expected_probs(LOGITS, suppressed=stop), "min_tokens suppressed")
        check_distribution(late_tokens, expected_probs(LOGITS), "min_tokens reached")


def test_logprobs_are_raw_top_k_and_include_the_sampled_token():
    n = 2000
    raw = torch.log_softmax(torch.tensor(LOGITS, dtype=torch.float64), dim=-1).tolist()
    top2 = sorted(range(VOCAB), key=lambda i: -LOGITS[i])[:2]
    rows = []
    for i in range(n):
        kind = i % 4
        params = [SamplingParams(temperature=2.5, logprobs=2),
                  SamplingParams(temperature=0.5, top_k=4, logprobs=0),
                  SamplingParams(temperature=1.0),  # no logprobs asked
                  SamplingParams(temperature=1.0, logprobs=2, min_tokens=5)][kind]
        rows.append(row(params, rid=f"r{i}", stop_ids={top2[0]} if kind == 3 else ()))
    tokens, logprobs = Sampler(seed=0, device=torch.device("cpu"))(torch.tensor([LOGITS] * n), rows)
    outside_top = 0
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        kind = i % 4
        if kind == 2:
            assert lp is None
            continue
        assert tok in lp, "the sampled token's logprob is missing"
        want = {tok} | (set(top2) if kind in (0, 3) else set())
        assert set(lp) == want
        for t, v in lp.items():
            # raw log_softmax: before temperature, top-k and min_tokens suppression
            assert abs(v - raw[t]) < 1e-5, f"row {i}: logprob of {t} is {v}, raw is {raw[t]}"
        outside_top += tok not in top2
    assert outside_top > 100  # the sampled token is often outside the top 2 and still reported


# ---- end to end with the engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from batchgen import LLM

    return LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=256, seed=0)


def test_engine_seed_independent_of_batch(tiny_llm):
    prompt = [5, 17, 99, 250, 31, 7]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(alone) == 16

    others = [([3 + i] * (3 + 5 * i), SamplingParams(temperature=0.5 + 0.2 * i, top_k=5 * i, max_tokens=5 + i,
                                                     seed=None if i % 2 else i, ignore_eos=True))
              for i in range(7)]
    prompts = [p for p, _ in others[:3]] + [prompt] + [p for p, _ in others[3:]]
    plist = [s for _, s in others[:3]] + [params] + [s for _, s in others[3:]]
    outs = tiny_llm.generate(prompts, plist, use_tqdm=False)
    assert all(o.error is None for o in outs)
    assert outs[3].outputs[0].token_ids == alone, "a seeded request changed with its batch"
    again = tiny_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone, "the same seeded request differs between two generate calls"


def test_engine_n_completions(tiny_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    outs = tiny_llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)
    assert len(outs) == 1 and outs[0].error is None
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) > 1, "n=3 with seeds should not give 3 equal samples"
    again = tiny_llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in again] == [c.token_ids for c in comps]
