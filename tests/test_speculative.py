"""Speculative decoding: greedy output equals plain decoding, sampled output keeps the target's
distribution, and it composes with chunked prefill, the prefix cache, preemption and stops."""

from __future__ import annotations

import random

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.exec.rejection import verify_sampled
from batchgen.speculative.ngram import ngram_propose
from tests.conftest import assert_greedy_match

# -- n-gram lookup ---------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(tokens, 2, 1, 3) == [7, 8]  # the most recent earlier "1 2 3"
    assert ngram_propose([4, 5, 6], 3, 1, 2) == []
    assert ngram_propose([5, 5, 5, 5], 2, 2, 2) == [5, 5]


# -- rejection sampling keeps the target distribution -----------------------------------------------


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), chi2 / 2))


@pytest.mark.parametrize("draft", ["one-hot", "distribution"])
def test_rejection_sampling_output_follows_the_target(draft):
    gen = torch.Generator().manual_seed(0)
    vocab, trials = 6, 12000
    p = torch.tensor([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1], [0.2] * 5 + [0.0]])
    q = torch.tensor([[0.4, 0.1, 0.1, 0.1, 0.2, 0.1]])
    counts = torch.zeros(vocab)
    for _ in range(trials):
        x = int(torch.multinomial(q[0], 1, generator=gen)) if draft == "distribution" else 0
        accepted, token = verify_sampled(p, [x], q if draft == "distribution" else None, gen)
        first = accepted[0] if accepted else token
        counts[first] += 1
    assert _chi2_pvalue(counts, p[0]) > 1e-3


# -- end to end -------------------------------------------------------------------------------------

COPY_CHATS = [
    "Repeat exactly: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Copy this list: apples, pears, plums, apples, pears, plums, apples, pears, plums.",
    "Rewrite in lowercase: THE CAT SAT ON THE MAT. THE DOG SAT ON THE LOG.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def smol_plain(smol_dir):
    llm = LLM(smol_dir, dtype="float32")
    outs = llm.chat([[{"role": "user", "content": c}] for c in COPY_CHATS],
                    SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    return [o.prompt_token_ids for o in outs], [o.outputs[0].token_ids for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1),
    dict(method="draft", draft_model="smollm2-135m", num_speculative_tokens=3),
], ids=["ngram", "draft-self"])
def test_greedy_spec_equals_plain_on_embedded_model(spec, smol_dir, smol_plain):
    prompts, plain = smol_plain
    llm = LLM(smol_dir, dtype="float32", speculative=spec)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    assert_greedy_match(smol_dir, prompts, [o.outputs[0].token_ids for o in outs], plain)
    stats = llm.stats()
    assert stats["spec_accepted_tokens"] > 0
    if spec["method"] == "draft":
        assert stats["spec_acceptance_rate"] >= 0.9  # the target as its own draft


def _repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 40) for _ in range(rng.randint(3, 6))] * rng.randint(3, 8) for _ in range(n)]


@pytest.mark.parametrize("engine", [
    dict(),
    dict(max_num_batched_tokens=9),  # verification chunks compete with prefill chunks for the budget
    dict(num_kv_blocks=6, max_model_len=96),  # preemption; rolled-back blocks return to the pool
], ids=["plain", "chunked", "preempting"])
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_spec_composes_with_scheduling(method, engine, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    prompts = _repetitive_prompts(6, seed=11)
    prompts += [prompts[0] + p for p in _repetitive_prompts(2, seed=12)]  # prefix-cache hits
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 9, 13, 16, 7, 11, 12, 3)]
    plain = LLM(model_dir, dtype="float32", **engine).generate(prompts, params, use_tqdm=False)
    spec = dict(method=method, num_speculative_tokens=3, prompt_lookup_min=1,
                draft_model=tiny_model_dir("llama") if method == "draft" else None)
    llm = LLM(model_dir, dtype="float32", speculative=spec, **engine)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o, p, sp in zip(outs, plain, params):  # never past max_tokens (nor max_model_len)
        assert len(o.outputs[0].token_ids) == len(p.outputs[0].token_ids) <= sp.max_tokens
    assert_greedy_match(model_dir, prompts, [o.outputs[0].token_ids for o in outs],
                        [p.outputs[0].token_ids for p in plain])
    stats = llm.stats()
    assert stats["spec_accepted_tokens"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks"]
    if "num_kv_blocks" in engine:
        assert stats["preemptions"] > 0


def test_spec_stops_at_stop_token_inside_accepted_run(tiny_model_dir):
    """A stop token among accepted proposals ends the row there; nothing after it leaks out."""
    model_dir = tiny_model_dir("llama")
    prompts = _repetitive_prompts(4, seed=13)
    plain = LLM(model_dir, dtype="float32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    stop_ids = [p.outputs[0].token_ids[5] for p in plain]
    draft = dict(method="draft", draft_model=model_dir, num_speculative_tokens=4)
    llm = LLM(model_dir, dtype="float32", speculative=draft)
    for prompt, ref, stop in zip(prompts, plain, stop_ids):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop]),
                           use_tqdm=False)[0].outputs[0]
        want = ref.outputs[0].token_ids[:ref.outputs[0].token_ids.index(stop) + 1]
        assert out.token_ids == want and out.finish_reason == "stop" and out.stop_reason == stop


def test_spec_stop_strings_see_every_accepted_token(smol_dir):
    """Stop strings are matched over all tokens a step adds (accepted proposals too): the same text,
    tokens and counts as plain decoding, and nothing after the stop string leaks out."""
    params = [SamplingParams(temperature=0, max_tokens=40, stop=[stop]) for stop in (" lazy", "plums,", " ON THE")]
    plain_llm = LLM(smol_dir)
    plain = plain_llm.chat([[{"role": "user", "content": c}] for c in COPY_CHATS[:3]], params, use_tqdm=False)
    spec = dict(method="ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=4)
    llm = LLM(smol_dir, speculative=spec)
    outs = llm.chat([[{"role": "user", "content": c}] for c in COPY_CHATS[:3]], params, use_tqdm=False)
    assert llm.stats()["spec_accepted_tokens"] > 0
    for ours, ref in zip(outs, plain):
        assert ours.outputs[0].finish_reason == ref.outputs[0].finish_reason == "stop"
        assert ours.outputs[0].text == ref.outputs[0].text
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
    assert llm.stats()["generated_tokens"] == plain_llm.stats()["generated_tokens"]


def test_sampled_spec_keeps_the_target_distribution(tiny_model_dir):
    """Joint distribution of the first two tokens, the second drawn through rejection sampling
    against a different draft model, equals the target's exact one (chi-square)."""
    from transformers import AutoModelForCausalLM

    target_dir = tiny_model_dir("llama")
    draft_dir = tiny_model_dir("qwen2")  # another random model: it disagrees often
    prompt = [5, 17, 33, 2 + 40, 7]
    params = SamplingParams(temperature=1.0, top_k=6, max_tokens=3, ignore_eos=True)

    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    def topk_probs(logits: torch.Tensor) -> torch.Tensor:
        kth = logits.topk(6).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    with torch.no_grad():
        p1 = topk_probs(hf(torch.tensor([prompt])).logits[0, -1])  # [vocab]
        firsts = p1.nonzero().flatten().tolist()
        p2 = topk_probs(hf(torch.tensor([prompt + [t] for t in firsts])).logits[:, -1])  # [6, vocab]
    llm = LLM(target_dir, dtype="float32", max_num_seqs=512,
              speculative=dict(method="draft", draft_model=draft_dir, num_speculative_tokens=1,
                               max_batch_size=512))
    outs = llm.generate([prompt] * 3000, params, use_tqdm=False)
    assert llm.stats()["spec_proposed_tokens"] > 0
    assert 0.01 < llm.stats()["spec_acceptance_rate"] < 0.99  # both branches of the test ran
    vocab = p1.shape[0]
    counts = torch.zeros(len(firsts) * vocab)
    for o in outs:
        t1, t2 = o.outputs[0].token_ids[:2]
        counts[firsts.index(t1) * vocab + t2] += 1
    exact = (p1[firsts].unsqueeze(1) * p2).flatten()
    assert counts[exact == 0].sum() == 0
    assert _chi2_pvalue(counts, exact) > 1e-3
