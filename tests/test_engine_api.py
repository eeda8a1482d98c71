"""The LLM API: ordering, per-row errors, parameter validation, stop conditions, logprobs, stats.

Most tests run a tiny random Llama (fast); the few marked slow run the embedded SmolLM2 through
`llm.chat`, where text (stop strings) means something.
"""

from __future__ import annotations

import pytest

from batchgen import LLM, SamplingParams

TINY_VOCAB = 512  # tests/conftest.py TINY


def tiny(tiny_model_dir, **kw) -> LLM:
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=256, **kw)
    return LLM(tiny_model_dir("llama"), **kw)


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return tiny(tiny_model_dir, max_model_len=128)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def ids(n: int, start: int = 3) -> list[int]:
    return [(start + 37 * i) % (TINY_VOCAB - 3) + 3 for i in range(n)]


# ---- ordering and per-row errors ------------------------------------------------------------------


def test_outputs_in_input_order(llm):
    # long prompts with few tokens finish first, short ones with many tokens last
    prompts = [ids(5 + 9 * i, start=i) for i in range(8)]
    params = [greedy(max_tokens=16 - 2 * i, ignore_eos=True) for i in range(8)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == 8
    for i, out in enumerate(outs):
        assert out.request_id == str(i)
        assert out.prompt_token_ids == prompts[i]
        assert out.error is None and out.finished
        assert len(out.outputs) == 1 and len(out.outputs[0].token_ids) == 16 - 2 * i


def test_bad_rows_become_errors_and_the_rest_complete(llm):
    good = ids(10)
    prompts = [good, [], ids(129), [5, TINY_VOCAB + 3, 7], good[:4], [-1, 4], ids(128)]
    outs = llm.generate(prompts, greedy(4, ignore_eos=True), use_tqdm=False)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(prompts))]
    bad = {1: "empty", 2: "max_model_len", 3: "vocab", 5: "vocab"}
    for i, out in enumerate(outs):
        if i in bad:
            assert out.error and bad[i] in out.error, f"row {i}: error {out.error!r}"
            assert out.outputs[0].finish_reason == "error" and out.outputs[0].token_ids == []
        else:
            assert out.error is None, f"row {i}: {out.error}"
            # a prompt of exactly max_model_len tokens gets the one token that fits
            assert len(out.outputs[0].token_ids) == (1 if i == 6 else 4)
            assert out.outputs[0].finish_reason == "length"
    assert llm.stats()["running"] == 0 and llm.stats()["waiting"] == 0


def test_empty_string_prompt_is_an_error(llm):
    outs = llm.generate(["", ids(3)], greedy(2), use_tqdm=False)
    assert outs[0].error and "empty" in outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None


def test_request_errors_are_counted(tiny_model_dir):
    llm = tiny(tiny_model_dir, max_model_len=64)
    llm.generate([[], ids(65), ids(5)], greedy(2), use_tqdm=False)
    stats = llm.stats()
    assert stats["requests_finished"] == 1
    assert stats["request_errors"] == 2, (
        "BUG: Engine._counters['request_errors'] is never incremented (engine.py: add_request puts bad "
        f"rows on _ready without counting them); stats() reports {stats['request_errors']} for 2 bad rows")


def test_out_of_vocab_stop_token_id_does_not_crash_the_batch(tiny_model_dir):
    llm = tiny(tiny_model_dir)  # its own engine: a crash mid-step leaves the engine unusable
    params = [greedy(4, ignore_eos=True), greedy(4, min_tokens=2, stop_token_ids=[TINY_VOCAB + 100], ignore_eos=True)]
    try:
        outs = llm.generate([ids(6), ids(7)], params, use_tqdm=False)
    except IndexError as e:
        pytest.fail("BUG: SamplingParams(stop_token_ids=[id >= vocab], min_tokens>0) crashes the whole batch "
                    "with IndexError in Sampler.__call__ (exec/sampler.py, `logits[i, list(r.stop_ids)] = -inf`); "
                    "the row should complete (the id can never be sampled) or come back with `error` set: "
                    f"{e}")
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 4
    assert outs[1].error is not None or len(outs[1].outputs[0].token_ids) == 4


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("min_p", -0.1),
    ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("seed", "7"), ("seed", 1.5), ("stop", [""]),
    ("stop_token_ids", [-3]), ("logprobs", -1), ("temperature", "hot"),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_invalid():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_mismatched_params_list_raises(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([ids(3), ids(4)], [greedy(2)], use_tqdm=False)


def test_unknown_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(Exception, match="no-such-model"):
        LLM(missing, device="cpu")
    empty_dir = tmp_path / "empty-model-dir"
    empty_dir.mkdir()
    with pytest.raises(Exception, match="empty-model-dir"):
        LLM(str(empty_dir), device="cpu")


def test_unknown_engine_argument_raises():
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM("whatever", max_num_seq=4)


# ---- stop conditions, lengths, logprobs ------------------------------------------------------------


def test_max_tokens_gives_length(llm):
    outs = llm.generate([ids(5), ids(9, start=50)], greedy(7, ignore_eos=True), use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 7 and c.stop_reason is None


def test_stop_token_ids(llm):
    prompt = ids(12, start=11)
    ref = llm.generate([prompt], greedy(12, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # first occurrence, not at the start
    out = llm.generate([prompt], greedy(12, ignore_eos=True, stop_token_ids=[ref[k]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ref[k]
    # min_tokens holds the stop token back, so generation runs past it
    held = llm.generate([prompt], greedy(12, ignore_eos=True, stop_token_ids=[ref[k]], min_tokens=k + 2),
                        use_tqdm=False)[0].outputs[0]
    assert ref[k] not in held.token_ids[:k + 2]
    assert len(held.token_ids) >= k + 2


def test_logprobs(llm):
    out = llm.generate([ids(8)], greedy(6, ignore_eos=True, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert isinstance(lp, dict) and len(lp) == 3 and tok in lp
        assert all(v <= 0 for v in lp.values())
        assert lp[tok] == max(lp.values())  # greedy: the sampled token is the most likely
    sampled = llm.generate([ids(8)], SamplingParams(temperature=1.5, seed=3, max_tokens=20, ignore_eos=True,
                                                    logprobs=1), use_tqdm=False)[0].outputs[0]
    assert all(tok in lp and len(lp) in (1, 2) for tok, lp in zip(sampled.token_ids, sampled.logprobs))
    plain = llm.generate([ids(8)], greedy(3), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None


def test_stats_counters(tiny_model_dir):
    # A budget of 64 tokens: the first prompt's four shared blocks are computed (and cached) in step 1,
    # before the other prompts are admitted, so those find them.
    llm = tiny(tiny_model_dir, max_num_batched_tokens=64)
    shared = ids(64, start=9)  # four full blocks of 16
    prompts = [shared + ids(5, start=100 + i) for i in range(4)]
    outs = llm.generate(prompts, greedy(5, ignore_eos=True), use_tqdm=False)
    stats = llm.stats()
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts)
    assert stats["generated_tokens"] == sum(o.num_generated_tokens for o in outs) == 20
    assert stats["requests_finished"] == 4
    assert stats["cached_prompt_tokens"] == 3 * 64
    assert stats["prefix_cache_hit_rate"] == pytest.approx(3 * 64 / (4 * 69))
    assert [o.num_cached_tokens for o in outs] == [0, 64, 64, 64]
    assert stats["computed_prompt_tokens"] == stats["prompt_tokens"] - stats["cached_prompt_tokens"]
    assert stats["kv_blocks_free"] == stats["kv_blocks"] and stats["running"] == stats["waiting"] == 0
    # a second round of the same prompts hits the cache for all but the last block of each
    llm.generate(prompts, greedy(2, ignore_eos=True), use_tqdm=False)
    again = llm.stats()
    assert again["cached_prompt_tokens"] - stats["cached_prompt_tokens"] == 4 * 64


def test_prefix_caching_off_reports_no_hits(tiny_model_dir):
    llm = tiny(tiny_model_dir, enable_prefix_caching=False)
    shared = ids(64, start=9)
    llm.generate([shared + [5], shared + [6]], greedy(2), use_tqdm=False)
    assert llm.stats()["prefix_cache_hit_rate"] == 0.0


# ---- the embedded model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_llm(smol_dir) -> LLM:
    return LLM(smol_dir, dtype="float32", device="cpu", num_kv_blocks=64)


CHAT = [{"role": "user", "content": "List three primary colors."}]


@pytest.mark.slow
def test_stop_string_on_embedded_model(smol_llm):
    ref = smol_llm.chat(CHAT, greedy(16), use_tqdm=False)[0].outputs[0]
    words = [w.strip(".,:;!?\n") for w in ref.text.split()]
    stop = next((w for w in words[2:] if len(w) >= 3 and ref.text.index(w) > 0), None)
    assert stop is not None, f"no usable stop word in {ref.text!r}"
    out = smol_llm.chat(CHAT, greedy(16, stop=[stop, "zzzz-never"]), use_tqdm=False)[0].outputs[0]
    at = ref.text.index(stop)
    assert out.text == ref.text[:at], (out.text, ref.text, stop)
    assert stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == ref.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(ref.token_ids)


@pytest.mark.slow
def test_chat_batch_in_order_with_shared_prefix(smol_llm):
    system = {"role": "system", "content": "You are a terse assistant. Answer in at most five words, "
                                           "without any punctuation, and never explain yourself."}
    questions = ["What is 2 plus 2?", "Name a fruit.", "What color is the sky?"]
    before = smol_llm.stats()
    outs = smol_llm.chat([[system, {"role": "user", "content": q}] for q in questions], greedy(6), use_tqdm=False)
    after = smol_llm.stats()
    assert [o.request_id for o in outs] == ["0", "1", "2"]
    for q, o in zip(questions, outs):
        assert o.error is None and q in o.prompt and o.outputs[0].token_ids
        assert o.outputs[0].finish_reason in ("stop", "length")
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in outs)
    # a later request with the same system prompt finds it in the cache
    late = smol_llm.chat([system, {"role": "user", "content": "Name a bird."}], greedy(2), use_tqdm=False)[0]
    assert late.error is None and late.num_cached_tokens >= 16
    assert smol_llm.stats()["prefix_cache_hit_rate"] > 0
