"""Multi-LoRA: PEFT is the oracle.

Adapters are made with PEFT on the embedded SmolLM2 (random, non-zero B so that each changes the
output), saved with save_pretrained and served side by side with base-model rows in one generate
call, with fewer device slots than adapters (swaps). Per row, the greedy tokens must equal the PEFT
model's with that row's adapter (HF generate, fp32, one prompt at a time), up to measured near-ties.
Also: the slot manager and the scheduler's slot admission (pure Python), refusals of adapters
batchgen cannot apply, unknown names as error rows, and no KV sharing across adapters.
"""

from __future__ import annotations

import json

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.cache.kv_manager import KVCacheManager
from batchgen.config import EngineConfig
from batchgen.lora.slots import LoRASlots
from batchgen.request import Request
from batchgen.sched.output import ModelOutput
from batchgen.sched.scheduler import Scheduler, SchedulerConfig
from tests.conftest import assert_greedy_match, hf_greedy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> LoraConfig arguments: different ranks, targets, scalings
ADAPTERS = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16": dict(r=16, lora_alpha=8, target_modules=ALL, use_rslora=True),
    "od4": dict(r=4, lora_alpha=16, target_modules=["o_proj", "down_proj"]),
}
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
]


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def make_peft(base_dir: str, out_dir, adapters: dict[str, dict], b_scale: float = 1.0, seed: int = 0):
    """A PeftModel over the fp32 base with `adapters` (random A and B), each saved to out_dir/<name>."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = None
    for name, kw in adapters.items():
        cfg = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kw)
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():  # kaiming-uniform B moves SmolLM2 far off; keep it changed but sane
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(b_scale)
    peft_model.save_pretrained(str(out_dir))
    paths = {name: str(out_dir / name) for name in adapters}
    return peft_model.eval(), paths


@pytest.fixture(scope="module")
def peft_setup(smol_dir, tmp_path_factory):
    return make_peft(smol_dir, tmp_path_factory.mktemp("adapters"), ADAPTERS, b_scale=0.5)


@pytest.fixture(scope="module")
def llm(smol_dir, peft_setup) -> LLM:
    _, paths = peft_setup
    return LLM(smol_dir, dtype="float32", device="cpu", num_kv_blocks=160, max_model_len=512,
               lora_adapters=paths, max_loras=2)


def peft_greedy(peft_model, adapter: str | None, prompts: list[list[int]], max_tokens: int = MAX_TOKENS):
    if adapter is None:
        with peft_model.disable_adapter():
            return hf_greedy(None, prompts, max_tokens, model=peft_model)
    peft_model.set_adapter(adapter)
    return hf_greedy(None, prompts, max_tokens, model=peft_model)


def check_rows(peft_model, rows: list[tuple[list[int], str | None]], ours: list[list[int]]) -> None:
    """Per adapter, our tokens against PEFT's with that adapter active (near-ties measured there too)."""
    for adapter in dict.fromkeys(a for _, a in rows):
        idx = [i for i, (_, a) in enumerate(rows) if a == adapter]
        prompts = [rows[i][0] for i in idx]
        theirs = peft_greedy(peft_model, adapter, prompts)
        if adapter is None:
            with peft_model.disable_adapter():
                assert_greedy_match(None, prompts, [ours[i] for i in idx], theirs, hf_model=peft_model)
        else:
            peft_model.set_adapter(adapter)
            assert_greedy_match(None, prompts, [ours[i] for i in idx], theirs, hf_model=peft_model)


# ---- the PEFT oracle ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_mixed_adapters_and_base_in_one_call_match_peft(llm, peft_setup, path, monkeypatch):
    """Both CPU paths: the C++ kernel (kernels/cpu_lora.py) and the batched torch fallback."""
    peft_model, _ = peft_setup
    monkeypatch.setattr(llm.engine.lora, "use_cpu_kernel", path == "kernel" and llm.engine.lora.use_cpu_kernel)
    tok = llm.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    # every adapter and the base model, interleaved; 3 adapters over 2 device slots
    plan = [(0, None), (0, "qv8"), (1, "all16"), (2, "od4"), (1, None), (2, "all16"), (1, "qv8"), (2, None),
            (1, "od4")]
    names = [name for _, name in plan]
    rows = [(ids[i], name) for i, name in plan]
    loads_before = llm.stats()["lora_loads"]
    outs = llm.generate([p for p, _ in rows], greedy(), use_tqdm=False, lora=[a for _, a in rows])
    assert all(o.error is None for o in outs)
    assert [o.lora for o in outs] == names
    ours = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == MAX_TOKENS for t in ours)
    assert llm.stats()["lora_slots"] == 2
    assert llm.stats()["lora_loads"] - loads_before >= 3, "3 adapters over 2 slots: at least one swap"
    check_rows(peft_model, rows, ours)
    # the adapters matter: each changes what the base model says for some prompt
    base = {i: t for (i, a), t in zip(plan, ours) if a is None}
    for name in ADAPTERS:
        assert any(t != base[i] for (i, a), t in zip(plan, ours) if a == name), f"{name} changes nothing"


def test_chat_with_per_row_adapters(llm, peft_setup):
    peft_model, _ = peft_setup
    convs = [[{"role": "user", "content": "Name a color."}], [{"role": "user", "content": "Say hi."}]]
    outs = llm.chat(convs, greedy(8), use_tqdm=False, lora=["od4", None])
    assert [o.lora for o in outs] == ["od4", None] and all(o.error is None for o in outs)
    for out, adapter in zip(outs, ["od4", None]):
        theirs = peft_greedy(peft_model, adapter, [out.prompt_token_ids], max_tokens=8)
        if adapter:
            peft_model.set_adapter(adapter)
            assert_greedy_match(None, [out.prompt_token_ids], [out.outputs[0].token_ids], theirs, hf_model=peft_model)
        else:
            with peft_model.disable_adapter():
                assert_greedy_match(None, [out.prompt_token_ids], [out.outputs[0].token_ids], theirs,
                                    hf_model=peft_model)


# ---- per-row errors and the prefix cache --------------------------------------------------------------


def test_unknown_adapter_is_an_error_row(llm):
    outs = llm.generate(["Hello", "Hello"], greedy(2), use_tqdm=False, lora=["nope", "qv8"])
    assert outs[0].error and "unknown LoRA adapter 'nope'" in outs[0].error
    assert "loaded: " in outs[0].error and "'qv8'" in outs[0].error
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 2
    with pytest.raises(ValueError, match="lora entries"):
        llm.generate(["a", "b"], greedy(2), use_tqdm=False, lora=["qv8"])


def test_radix_cache_never_shares_kv_across_adapters(llm):
    prompt = llm.tokenizer.encode("A long shared preamble about caching, adapters and prefixes. " * 4)
    assert len(prompt) > 3 * 16
    first = {}
    for adapter in [None, "qv8", "od4"]:  # the first of each: nothing cached for this adapter
        out = llm.generate([prompt], greedy(4), use_tqdm=False, lora=adapter)[0]
        assert out.num_cached_tokens == 0, f"adapter {adapter!r} hit another adapter's KV"
        first[adapter] = out.outputs[0].token_ids
    for adapter in ["qv8", None, "od4"]:  # again: now it hits its own blocks, with the same result
        out = llm.generate([prompt], greedy(4), use_tqdm=False, lora=adapter)[0]
        assert out.num_cached_tokens >= 3 * 16
        assert out.outputs[0].token_ids == first[adapter]


# ---- refusals -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory):
    """Adapters over the tiny random Llama: a good one and several batchgen must refuse."""
    base_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("tiny-adapters")
    _, paths = make_peft(base_dir, out, {
        "good": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        "head": dict(r=4, target_modules=["q_proj", "lm_head"]),
        "dora": dict(r=4, target_modules=["v_proj"], use_dora=True),
        "big": dict(r=32, target_modules=["v_proj"]),
    })
    return base_dir, paths


def tiny_llm(base_dir, adapters, **kw) -> LLM:
    return LLM(base_dir, dtype="float32", device="cpu", num_kv_blocks=64, lora_adapters=adapters, **kw)


@pytest.mark.parametrize("name, message", [
    ("head", "lm_head"),
    ("dora", "DoRA"),
    ("big", "rank 32, more than max_lora_rank=16"),
])
def test_unsupported_adapters_are_refused(tiny_adapters, name, message):
    base_dir, paths = tiny_adapters
    with pytest.raises(ValueError, match=f"LoRA adapter '{name}'.*{message}"):
        tiny_llm(base_dir, {"good": paths["good"], name: paths[name]}, max_lora_rank=16)


def test_adapter_for_another_model_is_refused(tiny_adapters, tmp_path):
    base_dir, paths = tiny_adapters
    # the tiny adapter's shapes do not fit a model with another hidden size
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "wrong-shapes"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((__import__("pathlib").Path(paths["good"]) / "adapter_config.json")
                                             .read_text())
    weights = load_file(f"{paths['good']}/adapter_model.safetensors")
    save_file({k: (torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v) for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="LoRA adapter 'wrong'.*do not fit the base model"):
        tiny_llm(base_dir, {"wrong": str(bad)})
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="LoRA adapter 'gone'.*adapter_config.json"):
        tiny_llm(base_dir, {"gone": str(missing)})
    other = tmp_path / "prefix"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="LoRA adapter 'pt'.*PREFIX_TUNING"):
        tiny_llm(base_dir, {"pt": str(other)})


def test_engine_without_adapters_reports_unknown_names(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=64)
    out = llm.generate([[5, 6, 7]], greedy(2), use_tqdm=False, lora="x")[0]
    assert out.error == "unknown LoRA adapter 'x'; loaded: none"


def test_config_validation():
    with pytest.raises(ValueError, match="lora_adapters"):
        EngineConfig(lora_adapters=["a"])
    with pytest.raises(ValueError, match="max_loras"):
        EngineConfig(max_loras=0)
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig(max_lora_rank=0)


# ---- slots and scheduling (pure Python) -------------------------------------------------------------------


def test_slots_lru_and_pins():
    s = LoRASlots(2)
    assert s.acquire("a") == 0 and s.acquire("b") == 1
    assert s.take_loads() == [(0, "a"), (1, "b")]
    assert s.acquire("a") == 0 and s.take_loads() == []  # resident: no load
    assert not s.can_acquire("c") and s.acquire("c") is None  # both pinned
    s.release("b")
    assert s.can_acquire("c") and s.acquire("c") == 1 and s.take_loads() == [(1, "c")]  # b evicted
    s.release("a"), s.release("a"), s.release("c")
    s.acquire("c"), s.release("c")  # c is now the most recently used idle slot
    assert s.acquire("b") == 0  # a, idle longest, goes
    assert s.slot_of == {"b": 0, "c": 1} and s.num_loads == 4
    with pytest.raises(RuntimeError):
        s.release("c")


def run_scheduler(slots: LoRASlots, reqs: list[Request], budget=64):
    sched = Scheduler(SchedulerConfig(8, budget, 256), KVCacheManager(64, 16), slots)
    for r in reqs:
        sched.add(r)
    steps = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.scheduled
        live = {r.lora for r in sched.running if r.lora is not None}
        assert len(live) <= slots.num_slots
        for row in out.scheduled:
            req = next(r for r in reqs if r.request_id == row.request_id)
            assert row.lora_slot == (-1 if req.lora is None else slots.slot_of[req.lora])
        steps.append(out)
        sampled = [r for r in out.scheduled if r.sample]
        sched.update(out, ModelOutput([7] * len(sampled), [None] * len(sampled)))
    return steps


def test_scheduler_admits_only_with_a_slot_and_releases_pins():
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    reqs = [Request(f"r{i}", [3 + i] * 20, params, [2], lora=lora)
            for i, lora in enumerate(["a", "b", None, "c", "a", None, "b"])]
    slots = LoRASlots(2)
    steps = run_scheduler(slots, reqs, budget=512)
    loads = [ld for st in steps for ld in st.lora_loads]
    assert {name for _, name in loads} == {"a", "b", "c"}
    assert all(p == 0 for p in slots.pins)  # every pin released at finish
    # one-token rows first; within each part, rows grouped by slot
    for st in steps:
        keys = [(r.num_tokens != 1, r.lora_slot) for r in st.scheduled]
        assert keys == sorted(keys)
    # base rows never wait for a slot: both ran in the first step; c had to wait for a or b to finish
    first = {r.request_id for r in steps[0].scheduled}
    assert {"r0", "r1", "r2", "r4", "r5", "r6"} == first
    assert steps[0].lora_loads == [(0, "a"), (1, "b")]


def test_pins_follow_running_requests_under_preemption():
    """A tight KV pool forces preemptions; at every step each slot's pins equal its running requests,
    no two adapters share a slot, and every request finishes."""
    import random

    rng = random.Random(0)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [Request(f"r{i}", [rng.randrange(3, 60) for _ in range(rng.randrange(5, 40))], params, [2],
                    lora=rng.choice([None, "a", "b", "c", "d"])) for i in range(40)]
    slots = LoRASlots(2)
    sched = Scheduler(SchedulerConfig(6, 48, 256), KVCacheManager(12, 8), slots)
    for r in reqs:
        sched.add(r)
    loaded: dict[int, str] = {}
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.scheduled
        for slot, name in out.lora_loads:
            loaded[slot] = name
        for row in out.scheduled:  # rows run with the adapter that was loaded into their slot
            req = next(r for r in reqs if r.request_id == row.request_id)
            assert (row.lora_slot == -1) == (req.lora is None)
            assert req.lora is None or loaded[row.lora_slot] == req.lora
        for slot in range(2):
            users = [r for r in sched.running if r.lora is not None and slots.slot_of.get(r.lora) == slot]
            assert slots.pins[slot] == len(users)
        sampled = [r for r in out.scheduled if r.sample]
        sched.update(out, ModelOutput([7] * len(sampled), [None] * len(sampled)))
    assert not sched.has_unfinished() and all(r.finished for r in reqs)
    assert sched.num_preemptions > 0 and slots.num_loads > 4
    assert all(p == 0 for p in slots.pins)
