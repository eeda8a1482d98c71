"""Structured outputs in the engine, on the embedded model: the grammar's mask against independent
oracles (HF transformers logits + xgrammar's own matcher and bitmask kernel, jsonschema), mixed
batches, bad grammars, the compile timeout, the compile cache, n > 1, preemption and speculation."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
import xgrammar as xgr

from batchgen.engine import LLM
from batchgen.sampling import SamplingParams, StructuredOutputsParams

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"]}
ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                         "ok": {"type": "boolean"}}, "required": ["id", "ok"]}


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m", dtype="float32", max_model_len=512, max_num_seqs=64, num_kv_blocks=512)


@pytest.fixture(scope="module")
def tiny_full_vocab(tmp_path_factory, smol_dir) -> str:
    """A random 2-layer Llama with the embedded model's tokenizer and its whole 49152-token vocabulary:
    grammars need the real vocabulary, the many-row tests need a fast forward."""
    import transformers
    from transformers import AutoTokenizer

    from tests.conftest import TINY, save_random_model

    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152}, tie_word_embeddings=True)
    return save_random_model(config, AutoTokenizer.from_pretrained(smol_dir),
                             tmp_path_factory.mktemp("tiny-full-vocab"))


@pytest.fixture(scope="module")
def tiny(tiny_full_vocab):
    return LLM(tiny_full_vocab, dtype="float32", max_model_len=256, max_num_seqs=256, num_kv_blocks=1024)


def _params(schema=None, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 96)
    so = kw.pop("so", None) or StructuredOutputsParams(json=schema)
    return SamplingParams(structured_outputs=so, **kw)


def test_params_need_exactly_one_kind_and_normalise_json_text():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON text"):
        StructuredOutputsParams(json="{oops")
    with pytest.raises(ValueError, match="choice must be"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a+"})
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured_outputs={"jsn": {}})
    # A mapping, JSON text and a Parquet struct (None for absent keys) all mean the same thing.
    a = SamplingParams(structured_outputs={"json": {"type": "object", "required": ["x"]}})
    b = SamplingParams(structured_outputs='{"json": "{\\"required\\": [\\"x\\"], \\"type\\": \\"object\\"}"}')
    c = SamplingParams(structured_outputs={"json": {"required": ["x"], "type": "object"}, "regex": None})
    assert a.structured_outputs.key() == b.structured_outputs.key() == c.structured_outputs.key()
    assert a.structured_outputs.kind == "json"


def _allowed_oracle(tokenizer, vocab, params: StructuredOutputsParams, eos: list[int]):
    """xgrammar used directly (its own compiler, matcher and bitmask kernel), not batchgen's wrapper."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info)
    if params.kind == "json":
        grammar = compiler.compile_json_schema(json.dumps(params.json), any_whitespace=False, separators=(",", ":"))
    elif params.kind == "regex":
        grammar = compiler.compile_regex(params.regex)
    else:
        grammar = compiler.compile_grammar(params.grammar)
    return xgr.GrammarMatcher(grammar)


def test_teacher_forced_greedy_token_is_the_argmax_over_the_allowed_tokens(llm, smol_dir):
    from transformers import AutoModelForCausalLM

    cases = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(json=ITEM),
             StructuredOutputsParams(regex=r"[A-Z][a-z]{2,6}-[0-9]{2,3}"),
             StructuredOutputsParams(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?')]
    prompts = ["Describe a person as JSON:", "An item record:", "Product code:", "A sum:"]
    outs = llm.generate(prompts, [_params(so=c, temperature=0.0, max_tokens=32) for c in cases], use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    engine = llm.engine
    for prompt, case, out in zip(prompts, cases, outs):
        assert out.error is None
        tokens = out.outputs[0].token_ids
        assert tokens
        matcher = _allowed_oracle(llm.tokenizer, engine.vocab_size, case, engine.eos_token_ids)
        prompt_ids = out.prompt_token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + tokens])).logits[0]  # [positions, vocab]
        bitmask = xgr.allocate_token_bitmask(1, engine.vocab_size)
        for k, token in enumerate(tokens):
            step = logits[len(prompt_ids) - 1 + k].clone().unsqueeze(0)  # [1, vocab]: predicts token k
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(step, bitmask)
            best = float(step.max())
            assert math.isfinite(float(step[0, token])), f"{prompt!r} step {k}: token {token} is not allowed"
            assert float(step[0, token]) >= best - 1e-3, (
                f"{prompt!r} step {k}: {token} is not the argmax over allowed tokens ({int(step.argmax())})")
            assert matcher.accept_token(token)
        if out.outputs[0].finish_reason == "stop":
            assert matcher.is_terminated()


def test_mixed_batch_leaves_unconstrained_rows_token_for_token(tiny):
    llm = tiny
    plain_prompts = ["The capital of France is", "Once upon a time", "List three colors:", "def add(a, b):"]
    plain = [SamplingParams(max_tokens=12, temperature=0.0, logprobs=0),
             SamplingParams(max_tokens=12, temperature=0.0, logprobs=0),
             SamplingParams(max_tokens=12, temperature=1.0, seed=7, logprobs=0),
             SamplingParams(max_tokens=12, temperature=1.0, seed=11, logprobs=0)]
    alone = llm.generate(plain_prompts, plain, use_tqdm=False)
    constrained = [_params(ITEM, temperature=1.0, seed=i, max_tokens=12, logprobs=0) for i in range(4)]
    mixed = llm.generate(plain_prompts + ["JSON:"] * 4, plain + constrained, use_tqdm=False)
    for a, b in zip(alone, mixed[:4]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for out in mixed:
        c = out.outputs[0]
        for token, entry in zip(c.token_ids, c.logprobs):
            assert math.isfinite(entry[token]), f"{out.request_id}: NaN/inf logprob for its own token"
    for out in mixed[4:]:
        text = out.outputs[0].text
        assert '{"id":'.startswith(text) or text.startswith('{"id":'), text  # at least a prefix of the schema's JSON
        if out.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(text), ITEM)


def test_bad_grammars_error_only_their_row(llm):
    params = [_params(ITEM, temperature=0.0, max_tokens=40),
              _params({"type": "bogus"}),
              _params(so=StructuredOutputsParams(regex="[a-")),
              _params(so=StructuredOutputsParams(grammar="root ::= ")),
              SamplingParams(max_tokens=4, temperature=0.0, n=2, structured_outputs={"json": {"type": "nope"}}),
              _params(so=StructuredOutputsParams(choice=["yes", "no"]), temperature=0.0)]
    outs = llm.generate(["Item:", "a", "b", "c", "d", "Answer yes or no: is the sky blue?"], params, use_tqdm=False)
    assert outs[0].error is None and outs[5].error is None
    jsonschema.validate(json.loads(outs[0].outputs[0].text), ITEM)
    assert outs[5].outputs[0].text in ("yes", "no") and outs[5].outputs[0].finish_reason == "stop"
    assert "structured_outputs.json was rejected" in outs[1].error and "bogus" in outs[1].error
    assert "structured_outputs.regex was rejected" in outs[2].error
    assert "structured_outputs.grammar was rejected" in outs[3].error
    assert "structured_outputs.json was rejected" in outs[4].error  # n=2: one error for the request
    assert all(o.outputs[0].finish_reason == "error" for o in outs[1:5])


def test_compile_timeout_errors_the_row_and_others_run_on(llm):
    # 80 properties with patterns: xgrammar takes about a second to compile this against a 49k vocab.
    big = {"type": "object", "required": [f"f{i}" for i in range(80)],
           "properties": {f"f{i}": {"type": "string", "pattern": f"[a-z]{{{i % 5 + 1},{i % 7 + 8}}}[0-9]+"}
                          for i in range(80)}}
    state = llm.engine._structured_state()
    old, state.compile_timeout = state.compile_timeout, 0.05
    try:
        outs = llm.generate(["Big:", "Small:"], [_params(big), _params(ITEM, temperature=0.0, max_tokens=40)],
                            use_tqdm=False)
    finally:
        state.compile_timeout = old
    assert "took longer than 0.05s" in outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None
    jsonschema.validate(json.loads(outs[1].outputs[0].text), ITEM)


def _distinct_schema(i: int) -> dict:
    return {"type": "object", "properties": {f"k{i}": {"type": "integer", "minimum": i, "maximum": i + 5}},
            "required": [f"k{i}"]}


def test_200_distinct_schemas_plus_repeats_compile_once_each(tiny):
    llm = tiny
    before = llm.stats()
    schemas = [_distinct_schema(i) for i in range(200)]
    # Repeats: the same schema with its keys in another order is the same grammar.
    repeats = [dict(reversed(list(s.items()))) for s in schemas]
    params = [_params(s, temperature=0.0, max_tokens=12) for s in schemas + repeats]
    outs = llm.generate(["{"] * len(params), params, use_tqdm=False)
    after = llm.stats()
    assert after["structured_compiles"] - before.get("structured_compiles", 0) == 200
    assert after["structured_cache_hits"] - before.get("structured_cache_hits", 0) == 200
    for i, out in enumerate(outs):
        assert out.error is None, out.error
        text = out.outputs[0].text
        key = f'{{"k{i % 200}":'
        assert text.startswith(key[:len(text)]) or text.startswith(key), (i, text)
        if out.outputs[0].finish_reason == "stop":
            value = json.loads(text)
            jsonschema.validate(value, schemas[i % 200])


def test_n_samples_each_follow_the_grammar(tiny):
    llm = tiny
    out, = llm.generate(["Give a JSON object:"], [SamplingParams(
        n=3, max_tokens=64, temperature=1.0, seed=3, structured_outputs={"json": ITEM})], use_tqdm=False)
    assert len(out.outputs) == 3
    finished = [c for c in out.outputs if c.finish_reason == "stop"]
    assert finished
    for c in finished:
        jsonschema.validate(json.loads(c.text), ITEM)


def test_preemption_and_speculation_keep_outputs_in_the_grammar(tiny_full_vocab):
    # 12 KV blocks of 16 tokens for 8 rows: rows are preempted and recompute; ngram speculation runs
    # for the unconstrained rows and is off for the constrained ones.
    llm = LLM(tiny_full_vocab, dtype="float32", max_model_len=256, max_num_seqs=8, num_kv_blocks=12,
              speculative={"method": "ngram", "num_speculative_tokens": 3})
    prompts = [f"Record number {i}, as JSON:" for i in range(6)] + ["a b c a b c a b c a b", "1 2 3 1 2 3 1 2 3"]
    params = [_params(ITEM, temperature=1.0, seed=i, max_tokens=60) for i in range(6)]
    params += [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)] * 2
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["preemptions"] > 0
    done = 0
    for out in outs[:6]:
        assert out.error is None
        c = out.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), ITEM)
            done += 1
    assert done >= 3


def test_constrained_rows_get_no_speculative_proposals_and_wait_for_their_grammar():
    from batchgen.cache.kv_manager import KVCacheManager
    from batchgen.request import Request
    from batchgen.sched.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(8, 64, 256, num_speculative_tokens=3), KVCacheManager(32, 16, True))
    plain = Request("plain", [5, 6, 7], SamplingParams(max_tokens=20), [2])
    constrained = Request("json", [5, 6, 8], _params(ITEM, max_tokens=20), [2])
    compiling = Request("compiling", [5, 6, 9], _params(ITEM, max_tokens=20), [2])
    compiling.grammar_ready = False
    for r in (plain, constrained, compiling):
        sched.add(r)
    first = sched.schedule()
    assert {r.request_id for r in first.scheduled} == {"plain", "json"}  # the compiling one waits
    assert sched._num_spec(plain) == 3 and sched._num_spec(constrained) == 0
