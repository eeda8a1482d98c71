"""Sampling controls: penalties, logit_bias, allowed_token_ids, bad_words, stop/truncation options and
the repetition guard.

Oracles: HF `generate` with its own logits processors (RepetitionPenaltyLogitsProcessor,
NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor, PrefixConstrainedLogitsProcessor), fp32,
greedy; a greedy loop over HF logits minus the OpenAI penalty terms; the definitions themselves.
"""

from __future__ import annotations

import random

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.exec.penalties import LogitsProcessors, bad_words_token_ids
from batchgen.sched.output import ScheduledRequest
from batchgen.sched.repetition import RepetitionDetector

MAX_NEW = 12


def _prompts(n: int, seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 30))] for _ in range(n)]


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_generate(model, prompt: list[int], max_new: int, **kw) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def _greedy(max_tokens=MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _ours(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def smol(smol_dir):
    return LLM(smol_dir, dtype="float32", device="cpu", num_kv_blocks=128, max_model_len=256)


@pytest.fixture(scope="module")
def smol_hf(smol_dir):
    return _hf(smol_dir)


# ---- repetition_penalty against HF generate -----------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_repetition_penalty_matches_hf_generate(arch, tiny_model_dir):
    model_dir = tiny_model_dir(arch)
    prompts = _prompts(5, seed=3)
    hf = _hf(model_dir)
    penalties = [1.5, 1.5, 0.7, 1.2, 1.0]  # mixed in one batch; 1.0 is off (the fast path's row)
    theirs = [_hf_generate(hf, p, MAX_NEW, repetition_penalty=r) for p, r in zip(prompts, penalties)]
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=16)
    ours = _ours(llm, prompts, [_greedy(repetition_penalty=r) for r in penalties])
    plain = _ours(llm, prompts[:1], _greedy())
    assert ours[0] != plain[0], "the penalty changed nothing: the test would not see it broken"
    for p, a, b, r in zip(prompts, ours, theirs, penalties):
        if a != b:  # a near-tie of the penalised logits (HF's processor is the oracle)
            _assert_penalised_tie(hf, p, a, b, r)


def _assert_penalised_tie(hf, prompt, ours, theirs, penalty, gap=1e-3):
    from transformers import RepetitionPenaltyLogitsProcessor

    k = next(j for j, (x, y) in enumerate(zip(ours, theirs)) if x != y)
    ids = torch.tensor([prompt + theirs[:k]])
    with torch.no_grad():
        logits = RepetitionPenaltyLogitsProcessor(penalty)(ids, hf(ids).logits[:, -1])[0]
    assert float(logits[theirs[k]] - logits[ours[k]]) < gap, f"diverged at {k}: {ours} vs HF {theirs}"


def test_repetition_penalty_on_embedded_model(smol, smol_hf):
    tok = smol.tokenizer
    prompts = [tok.encode(t) for t in ["The cat sat on the mat. The cat", "1, 2, 3, 4, 5, 6,"]]
    theirs = [_hf_generate(smol_hf, p, MAX_NEW, repetition_penalty=1.3) for p in prompts]
    ours = _ours(smol, prompts, _greedy(repetition_penalty=1.3))
    for p, a, b in zip(prompts, ours, theirs):
        if a != b:
            _assert_penalised_tie(smol_hf, p, a, b, 1.3)


# ---- presence / frequency: a greedy loop over HF logits minus the OpenAI terms ----------------------------

def _openai_penalty_loop(hf, prompt, max_new, presence, frequency):
    out: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        out.append(int(logits.argmax()))
    return out


def test_presence_and_frequency_penalties_match_openai_definition(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    hf = _hf(model_dir)
    prompts = _prompts(4, seed=11)
    settings = [(1.5, 0.0), (0.0, 1.0), (0.5, 0.8), (-1.0, 0.0)]
    theirs = [_openai_penalty_loop(hf, p, MAX_NEW, pr, fr) for p, (pr, fr) in zip(prompts, settings)]
    llm = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=64)
    ours = _ours(llm, prompts, [_greedy(presence_penalty=pr, frequency_penalty=fr) for pr, fr in settings])
    plain = _ours(llm, prompts, _greedy())
    assert ours != plain
    for a, b in zip(ours, theirs):
        assert a == b


# ---- bad_words, logit_bias, allowed_token_ids on the embedded model ------------------------------------

def test_bad_words_match_hf_no_bad_words_processor(smol, smol_hf):
    tok = smol.tokenizer
    prompt = tok.encode("The capital of France is Paris. The capital of Germany is")
    free = _ours(smol, [prompt], _greedy())[0]
    # Ban a word the model does generate: the text of two generated tokens, and one single token.
    word = tok.decode(free[1:3]).strip()
    single = tok.decode(free[5:6]).strip()
    params = _greedy(bad_words=[word, single])
    ids = bad_words_token_ids(params, tok)
    assert any(len(w) > 1 for w in ids)
    ours = _ours(smol, [prompt], params)[0]
    theirs = _hf_generate(smol_hf, prompt, MAX_NEW, bad_words_ids=ids)
    assert ours == theirs
    assert ours != free
    for w in ids:  # by definition: no banned sequence in the output
        assert not any(ours[j:j + len(w)] == w for j in range(len(ours)))


def test_logit_bias_matches_hf_sequence_bias(smol, smol_hf):
    tok = smol.tokenizer
    prompt = tok.encode("My favourite colour is")
    free = _ours(smol, [prompt], _greedy())[0]
    bias = {free[0]: -100.0, free[2]: -5.0, 1000: 3.0}
    ours = _ours(smol, [prompt], _greedy(logit_bias={str(k): v for k, v in bias.items()}))[0]  # JSON keys
    theirs = _hf_generate(smol_hf, prompt, MAX_NEW, sequence_bias={(k,): v for k, v in bias.items()})
    assert ours == theirs
    assert ours[0] != free[0]


def test_allowed_token_ids_match_hf_prefix_constrained(smol, smol_hf):
    tok = smol.tokenizer
    prompt = tok.encode("Count: one, two,")
    allowed = sorted(set(tok.encode(" one two three four five six seven, and")))
    ours = _ours(smol, [prompt], _greedy(allowed_token_ids=allowed))[0]
    theirs = _hf_generate(smol_hf, prompt, MAX_NEW, prefix_allowed_tokens_fn=lambda batch, ids: allowed)
    assert ours == theirs
    assert set(ours) <= set(allowed)


def test_controls_mixed_with_plain_rows_leave_plain_rows_alone(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=64)
    prompts = _prompts(4, seed=5)
    alone = _ours(llm, prompts, _greedy())
    mixed = _ours(llm, prompts, [_greedy(), _greedy(logit_bias={7: 100}), _greedy(), _greedy(frequency_penalty=2)])
    assert mixed[0] == alone[0] and mixed[2] == alone[2]
    assert set(mixed[1]) == {7}


# ---- the processor state, by definition --------------------------------------------------------------

def _row(rid, tokens, n_out, params):
    return ScheduledRequest(rid, tokens[-1:], len(tokens) - 1, [], True, params, None, n_out,
                            all_token_ids=tokens)


def test_counts_are_incremental_and_slots_are_reused():
    proc = LogitsProcessors(torch.device("cpu"))
    vocab = 10
    p = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=2.0)
    tokens = [1, 2]  # prompt
    for step, new in enumerate([None, 3, 3, 4]):
        if new is not None:
            tokens.append(new)
        logits = proc.apply(torch.ones(1, vocab), [_row("a", tokens, step, p)])
        out = tokens[2:]
        for t in range(vocab):
            c = out.count(t)
            expect = 1.0 / 2.0 if (t in tokens) else 1.0
            expect -= 1.0 * c + 0.5 * (c > 0)
            assert logits[0, t].item() == pytest.approx(expect), (step, t)
    proc.forget(["a"])
    logits = proc.apply(torch.zeros(1, vocab), [_row("b", [5, 6], 0, SamplingParams(frequency_penalty=1.0))])
    assert torch.all(logits == 0)  # the reused slot starts from zero counts


def test_bad_word_prefix_in_prompt_does_not_ban():
    """vLLM's rule: a multi-token bad word is matched against generated tokens only."""
    proc = LogitsProcessors(torch.device("cpu"))
    p = SamplingParams(bad_words=["x"])
    p.bad_words_token_ids = [[4, 7], [9]]
    logits = proc.apply(torch.zeros(1, 12), [_row("r", [1, 4], 0, p)])  # prompt ends with 4: 7 stays allowed
    assert logits[0, 7] == 0 and logits[0, 9] == float("-inf")
    logits = proc.apply(torch.zeros(1, 12), [_row("r", [1, 4, 4], 1, p)])  # generated 4: 7 is banned
    assert logits[0, 7] == float("-inf")


# ---- stops and truncation ---------------------------------------------------------------------------

def test_include_stop_str_in_output(smol):
    prompt = "1, 2, 3, 4,"
    base = SamplingParams(temperature=0, max_tokens=12, stop=[" 6"])
    cut = smol.generate(prompt, base, use_tqdm=False)[0].outputs[0]
    kept = smol.generate(prompt, base.replace(include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + " 6"


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=64)
    prompt = _prompts(1, seed=2)[0] + list(range(10, 20))
    out = llm.generate([prompt], _greedy(truncate_prompt_tokens=6), use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-6:]
    assert out.outputs[0].token_ids == _ours(llm, [prompt[-6:]], _greedy())[0]


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 0), ("presence_penalty", 3), ("frequency_penalty", "a"), ("logit_bias", {"x": 1}),
    ("logit_bias", {1: 500}), ("allowed_token_ids", []), ("bad_words", [""]), ("truncate_prompt_tokens", 0),
    ("repetition_detection", {"max_period": 0}), ("repetition_detection", {"period": 3}),
    ("prompt_logprobs", -1),
])
def test_invalid_controls_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_out_of_vocab_ids_are_row_errors(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=64)
    outs = llm.generate([[5, 6], [5, 6]], [_greedy(logit_bias={999: 1}), _greedy(allowed_token_ids=[3, 600])],
                        use_tqdm=False)
    assert "logit_bias" in outs[0].error and "allowed_token_ids" in outs[1].error


# ---- the runaway guard -----------------------------------------------------------------------------

def test_repetition_detector_by_definition():
    det = RepetitionDetector({"max_period": 3, "min_repeats": 4})
    tokens = [9, 9]  # prompt: never counts
    hits = []
    for t in [1, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7]:
        tokens.append(t)
        hits.append(det.observe(tokens, 2))
    assert hits.index(True) == len(hits) - 1  # the 4th copy of (5, 6, 7) completes it
    det = RepetitionDetector(True)
    tokens = [3]
    assert not any(det.observe(tokens := tokens + [t], 1) for t in range(100))


def test_repetition_guard_stops_looping_rows_only(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=128)
    prompts = _prompts(8, seed=21)
    free = _ours(llm, prompts, _greedy(max_tokens=60))
    guard = {"max_period": 4, "min_repeats": 5}
    outs = llm.generate(prompts, _greedy(max_tokens=60, repetition_detection=guard), use_tqdm=False)
    looping = 0
    for f, o in zip(free, outs):
        c = o.outputs[0]
        if c.finish_reason == "repetition":
            looping += 1
            assert len(c.token_ids) < 60 and f[:len(c.token_ids)] == c.token_ids
            t = c.token_ids  # ends in 5 copies of some period p <= 4
            assert any(t[-5 * p:] == t[-p:] * 5 for p in range(1, 5))
        else:
            assert c.finish_reason == "length" and c.token_ids == f
    assert 0 < looping < len(prompts), "every row or none looped: pick another seed"


def test_openai_body_fields_become_row_overrides():
    from batchgen.job.openai_batch import parse_line

    cols = parse_line({"custom_id": "x", "body": {"messages": [{"role": "user", "content": "hi"}],
                                                  "presence_penalty": 0.5, "frequency_penalty": 0.2,
                                                  "logit_bias": {"50256": -100}, "repetition_penalty": 1.1,
                                                  "bad_words": ["foo"]}})
    params = SamplingParams(**{k: v for k, v in cols.items() if k != "messages"})
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.2, 1.1)
    assert params.logit_bias == {50256: -100} and params.bad_words == ["foo"]
