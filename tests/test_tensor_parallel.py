"""Tensor parallelism on real torch.distributed (gloo, 2 CPU ranks): greedy fp32 output with
tensor_parallel_size=2 equals tensor_parallel_size=1 and HF `generate` (up to measured near-ties), for a
Llama whose single KV head is replicated and a Qwen3 whose 2 KV heads are sharded, also with tiny prefill
chunks, preemption, the prefix cache, n-gram and draft-model speculation; MoE (experts sliced along their
intermediate dim), Gemma and Phi-3 too; multi-LoRA matches PEFT; a killed or hung
rank is an error naming it, not a hang.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.distributed.group import TensorParallelError
from batchgen.distributed.layers import ShardPlan
from tests.conftest import TINY, assert_greedy_match, hf_greedy

MAX_NEW = 10


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    """Factory: a random tiny model from a transformers config class and overrides of tests/conftest.TINY."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made = {}

    def make(cls_name: str, **overrides) -> str:
        key = (cls_name, tuple(sorted(overrides.items())))
        if key not in made:
            config = getattr(transformers, cls_name)(**{**TINY, **overrides})
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.08)
                    elif "bias" in name:
                        p.normal_(0, 0.5)
            path = tmp_path_factory.mktemp(cls_name.lower())
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(smol_dir).save_pretrained(path)
            made[key] = str(path)
        return made[key]

    return make


def _generate(model_dir: str, prompts, tp: int, params=None, **engine):
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=tp, **engine)
    try:
        outs = llm.generate(prompts, params or SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                            use_tqdm=False)
        assert all(o.error is None for o in outs)
        return [o.outputs[0].token_ids for o in outs], llm.stats()
    finally:
        llm.engine.shutdown()


def test_shard_plan_replicates_kv_heads_when_fewer_than_ranks():
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 KV head 1.
    plans = [ShardPlan(r, 4, num_heads=8, num_kv_heads=2, head_dim=16, intermediate=64, vocab_size=10) for r in range(4)]
    assert [p.kv_range() for p in plans] == [(0, 16), (0, 16), (16, 32), (16, 32)]
    assert [p.q_range() for p in plans] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert [p.vocab_range() for p in plans] == [(0, 3), (3, 6), (6, 9), (9, 10)]  # the last slice is short
    assert plans[1].slice_of("model.layers.0.self_attn.o_proj.weight") == (1, 32, 64)
    assert plans[1].slice_of("model.layers.0.self_attn.o_proj.bias") is None  # added once, after the reduce
    assert plans[1].slice_of("model.layers.0.mlp.down_proj.weight") == (1, 16, 32)
    assert plans[1].slice_of("model.norm.weight") is None
    # fused tensors keep one range per part, so a rank's shard keeps the fused layout
    moe = ShardPlan(1, 2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=64, vocab_size=10,
                    expert_intermediate=48, shared_intermediate=32)
    assert moe.cut_of("model.layers.0.self_attn.qkv_proj.weight") == (0, [(32, 64), (80, 96), (112, 128)])  # Phi-3
    assert moe.cut_of("model.layers.0.mlp.gate_up_proj.weight") == (0, [(32, 64), (96, 128)])
    assert moe.cut_of("model.layers.0.mlp.experts.gate_up_proj") == (1, [(24, 48), (72, 96)])  # [E, 2I, H]
    assert moe.cut_of("model.layers.0.mlp.experts.down_proj") == (2, [(24, 48)])  # [E, H, I]
    assert moe.cut_of("model.layers.0.mlp.experts.3.up_proj.weight") == (0, [(24, 48)])
    assert moe.cut_of("model.layers.0.block_sparse_moe.experts.3.w2.weight") == (1, [(24, 48)])  # Mixtral down
    assert moe.cut_of("model.layers.0.mlp.shared_expert.down_proj.weight") == (1, [(16, 32)])
    assert moe.cut_of("model.layers.0.mlp.gate.weight") is None  # the router, replicated
    assert moe.cut_of("model.layers.0.mlp.shared_expert_gate.weight") is None
    from types import SimpleNamespace

    from batchgen.distributed.layers import check_divisible

    config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="must divide moe_intermediate_size=47"):
        check_divisible(config, 2, {"intermediate_size": 64, "moe_intermediate_size": 47})


@pytest.mark.parametrize("cls_name, overrides", [
    # one KV head for two ranks (replicated), a tied LM head and an odd vocabulary (uneven vocab slices)
    ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=509)),
    ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),  # sharded KV heads
    ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),  # q/k/v biases sharded with them
])
def test_tp2_matches_tp1_and_hf(tiny, cls_name, overrides):
    model_dir = tiny(cls_name, **overrides)
    prompts = _prompts(5, seed=3)
    prompts += [prompts[0][:30] + p for p in _prompts(2, seed=4)]  # a shared prefix: the prefix cache hits
    theirs = hf_greedy(model_dir, prompts, MAX_NEW)
    one, _ = _generate(model_dir, prompts, tp=1)
    two, stats = _generate(model_dir, prompts, tp=2)
    assert_greedy_match(model_dir, prompts, one, theirs)
    assert_greedy_match(model_dir, prompts, two, theirs)
    assert stats["cached_prompt_tokens"] > 0


@pytest.mark.parametrize("engine, expect", [
    (dict(max_num_batched_tokens=7, speculative={"method": "ngram", "num_speculative_tokens": 3,
                                                 "prompt_lookup_min": 1}), "chunks"),
    (dict(num_kv_blocks=10, block_size=16, max_model_len=128), "preemptions"),
    (dict(max_num_batched_tokens=16), "draft"),  # the draft is whole on rank 0
])
def test_tp2_with_small_chunks_speculation_or_preemption_matches_hf(tiny, engine, expect):
    model_dir = tiny("Qwen3Config", num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    if expect == "draft":  # the target as its own draft: every proposal is accepted, multi-token rows on every rank
        engine = {**engine, "speculative": {"method": "draft", "draft_model": model_dir, "num_speculative_tokens": 3}}
    rng = random.Random(5)
    prompts = _prompts(8, seed=6)
    prompts += [[rng.randrange(3, 500) for _ in range(5)] * 4 for _ in range(2)]  # repeats: n-gram hits
    theirs = hf_greedy(model_dir, prompts, MAX_NEW)
    ours, stats = _generate(model_dir, prompts, tp=2, **engine)
    assert_greedy_match(model_dir, prompts, ours, theirs)
    assert stats["kv_blocks_free"] == stats["kv_blocks"]  # every block came back
    if expect == "chunks":
        assert stats["steps"] > sum(len(p) for p in prompts) // 7
        assert stats["spec_proposed_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    elif expect == "preemptions":
        assert stats["preemptions"] > 0
    else:  # the same proposals and verdicts as one rank with the same draft
        assert stats["spec_acceptance_rate"] > 0.9
        one, one_stats = _generate(model_dir, prompts, tp=1, **engine)
        assert one == ours
        assert (one_stats["spec_proposed_tokens"], one_stats["spec_accepted_tokens"]) == \
            (stats["spec_proposed_tokens"], stats["spec_accepted_tokens"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "gemma2", "phi3"])
def test_moe_gemma_phi3_under_tp2_match_hf(arch, tmp_path_factory, smol_dir):
    """Experts sliced along their intermediate dim (Qwen2-MoE's shared expert too), Gemma's GeGLU and
    Phi-3's fused checkpoint tensors, with prefill chunks of 7 tokens; Qwen3-MoE also against TP=1."""
    from tests.tiny_models import hf_model, make_tiny

    model_dir = make_tiny(tmp_path_factory.mktemp(arch), smol_dir, arch)
    prompts = _prompts(5, seed=11)
    prompts += [prompts[0][:30] + p for p in _prompts(2, seed=12)]  # a shared prefix: the prefix cache hits
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, prompts, MAX_NEW, model=hf)
    ours, stats = _generate(model_dir, prompts, tp=2, max_num_batched_tokens=7)
    assert_greedy_match(model_dir, prompts, ours, theirs, hf_model=hf)
    assert stats["cached_prompt_tokens"] > 0
    if arch == "qwen3_moe":
        one, _ = _generate(model_dir, prompts, tp=1)
        assert_greedy_match(model_dir, prompts, one, theirs, hf_model=hf)


def test_stacked_and_per_expert_checkpoints_give_each_rank_the_same_shards(tmp_path, smol_dir):
    """transformers' in-memory layout (mlp.experts.gate_up_proj [E, 2I, H], read as two slices per rank)
    and the per-expert keys save_pretrained writes: each rank's w13 / w2 equal, and are its slices."""
    from safetensors.torch import save_file

    from batchgen.distributed.loading import iter_shards
    from batchgen.models.moe import Qwen3MoeForCausalLM
    from tests.tiny_models import hf_model, make_tiny

    model_dir = make_tiny(tmp_path / "per-expert", smol_dir, "qwen3_moe")
    hf = hf_model(model_dir)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    (tmp_path / "stacked").mkdir()
    save_file(state, tmp_path / "stacked" / "model.safetensors", metadata={"format": "pt"})
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(hf.config)
    inter, name = model.expert_inter, "model.layers.0.mlp"
    full_w13, full_w2 = state[f"{name}.experts.gate_up_proj"], state[f"{name}.experts.down_proj"]
    for rank in (0, 1):
        plan = ShardPlan(rank, 2, 4, 2, 16, hf.config.intermediate_size, hf.config.vocab_size, inter)
        got = [dict(model._stack_experts(iter_shards(d, plan))) for d in (model_dir, str(tmp_path / "stacked"))]
        lo, hi = plan.part(inter)
        want_w13 = torch.cat([full_w13[:, lo:hi], full_w13[:, inter + lo:inter + hi]], dim=1)  # [E, 2I/2, H]
        for shards in got:
            torch.testing.assert_close(shards[f"{name}.w13"], want_w13, rtol=0, atol=0)
            torch.testing.assert_close(shards[f"{name}.w2"], full_w2[:, :, lo:hi], rtol=0, atol=0)


def test_multi_lora_under_tp2_matches_peft(tiny, tmp_path, monkeypatch):
    """Rank 1 runs the torch LoRA path (BATCHGEN_CPU_KERNELS=0 in its environment), rank 0 the C++ kernel
    where it builds, then the torch path too: every row must equal PEFT's with its adapter."""
    from tests.test_lora import check_rows, make_peft

    model_dir = tiny("LlamaConfig", num_key_value_heads=2, tie_word_embeddings=False)
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model, paths = make_peft(model_dir, tmp_path, {
        "all8": dict(r=8, lora_alpha=16, target_modules=all7),
        "od4": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
        "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }, b_scale=0.5)
    monkeypatch.setenv("BATCHGEN_CPU_KERNELS", "0")  # read by the rank-1 process at its start
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, num_kv_blocks=64,
              lora_adapters=paths, max_loras=2)
    try:
        prompts = _prompts(3, seed=9)
        plan = [(0, None), (0, "all8"), (1, "od4"), (2, "qv4"), (1, "all8"), (2, None), (1, "qv4")]
        rows = [(prompts[i], name) for i, name in plan]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        for kernel in (llm.engine.lora.use_cpu_kernel, False):
            llm.engine.lora.use_cpu_kernel = kernel
            outs = llm.generate([p for p, _ in rows], params, use_tqdm=False, lora=[a for _, a in rows])
            assert all(o.error is None for o in outs)
            ours = [o.outputs[0].token_ids for o in outs]
            check_rows(peft_model, rows, ours)
            base = {i: t for (i, a), t in zip(plan, ours) if a is None}
            assert all(t != base[i] for (i, a), t in zip(plan, ours) if a == "all8" and i in base)
        assert llm.stats()["lora_loads"] >= 3  # 3 adapters over 2 slots: swaps
    finally:
        llm.engine.shutdown()


def test_killed_rank_is_an_error_naming_it(tiny):
    model_dir = tiny("LlamaConfig", num_key_value_heads=1)
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, num_kv_blocks=32)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        assert llm.generate(_prompts(2, seed=1), params, use_tqdm=False)[0].error is None
        os.kill(llm.engine.tp.children[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="rank 1"):
            llm.generate(_prompts(2, seed=2), params, use_tqdm=False)
        assert time.monotonic() - start < 30
    finally:
        llm.engine.shutdown()


def test_hung_rank_fails_within_the_timeout(tiny, monkeypatch):
    monkeypatch.setenv("BATCHGEN_TP_TIMEOUT", "8")
    model_dir = tiny("LlamaConfig", num_key_value_heads=1)
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2, num_kv_blocks=32)
    child = llm.engine.tp.children[1]
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        os.kill(child.pid, signal.SIGSTOP)  # alive but silent
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank\(s\) \[1\].*timeout"):
            llm.generate(_prompts(2, seed=2), params, use_tqdm=False)
        assert time.monotonic() - start < 8 + 20
    finally:
        child.kill()
        llm.engine.shutdown()


def test_data_parallel_makes_groups_of_tp_gpus():
    from batchgen.distributed.placement import group_gpus
    from batchgen.job.spec import JobSpecError
    from batchgen.job.tasks import resolve_data_parallel

    gpus = ["0", "1", "2", "3", "4"]
    assert group_gpus(resolve_data_parallel, "auto", gpus, 2) == (2, ["0,1", "2,3"])
    assert group_gpus(resolve_data_parallel, 1, gpus, 2) == (1, None)
    assert group_gpus(resolve_data_parallel, "auto", gpus[:2], 2) == (1, None)
    assert group_gpus(resolve_data_parallel, None, [], 2) == (1, None)  # CPU
    with pytest.raises(JobSpecError, match="need 6 GPUs"):
        group_gpus(resolve_data_parallel, 3, gpus, 2)
    with pytest.raises(JobSpecError, match="only 1 GPU"):
        group_gpus(resolve_data_parallel, None, ["0"], 2)


def test_slurm_refuses_fewer_gpus_per_task_than_ranks(tmp_path):
    from batchgen.job.slurm import SlurmError, SlurmOptions, render_script
    from batchgen.job.spec import load_spec
    from tests.job.conftest import write_job, write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}])
    job = write_job(tmp_path / "job.yaml", model={"path": "smollm2-135m"}, input={"path": "rows.jsonl"},
                    output={"path": "out"}, engine={"tensor_parallel_size": 2})
    spec = load_spec(str(job))
    with pytest.raises(SlurmError, match="gpus-per-task >= 2"):
        render_script(str(job), spec, SlurmOptions(tasks=2, gpus_per_task=1), str(tmp_path / "logs"))
    script = render_script(str(job), spec, SlurmOptions(tasks=2, gpus_per_task=2), str(tmp_path / "logs"))
    assert "--gpus-per-task=2" in script and "--data-parallel auto" in script


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, smol_dir) -> str:
    """A tiny random Llama with SmolLM2's vocabulary (text prompts tokenize into it), one KV head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(**{**TINY, "vocab_size": 49152, "num_key_value_heads": 1, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("text-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(path)
    return str(path)


def _job(tmp_path, model_dir: str, name: str, tp: int, rows: int):
    from tests.job.conftest import write_job, write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", "prompt": f"Item {i}: the"} for i in range(rows)])
    return write_job(tmp_path / f"{name}.yaml", model={"path": model_dir, "dtype": "float32"},
                     input={"path": "rows.jsonl"}, output={"path": name, "commit_every_rows": 2},
                     sampling={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
                     engine={"device": "cpu", "max_model_len": 128, "max_num_seqs": 2, "num_kv_blocks": 32,
                             "tensor_parallel_size": tp})


def _texts(url) -> list[tuple[str, str]]:
    import pyarrow.dataset as pads

    return sorted((r["id"], r["generated_text"]) for r in pads.dataset(str(url)).to_table().to_pylist())


@pytest.mark.slow  # CLI subprocesses: several engine start-ups
def test_job_file_with_tp2_through_the_cli_kill_9_and_rerun_is_exactly_once(tmp_path, text_model_dir):
    import pyarrow.dataset as pads

    from tests.job.conftest import run_cli

    n = 10
    crashed = run_cli("run", "-q", str(_job(tmp_path, text_model_dir, "tp2", 2, n)),
                      env={"BATCHGEN_FAILPOINTS": "engine_step=12"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    parts = list((tmp_path / "tp2").rglob("*.parquet"))
    first = pads.dataset(str(tmp_path / "tp2")).to_table().num_rows if parts else 0
    assert first < n
    assert not _orphaned_ranks("engine_step=12", wait=10), "rank 1 outlived its killed rank 0"
    resumed = run_cli("run", "-q", str(_job(tmp_path, text_model_dir, "tp2", 2, n)))
    assert resumed.returncode == 0, resumed.stderr
    reference = run_cli("run", "-q", str(_job(tmp_path, text_model_dir, "tp1", 1, n)))
    assert reference.returncode == 0, reference.stderr
    got = _texts(tmp_path / "tp2")
    assert [i for i, _ in got] == sorted(f"r{i}" for i in range(n))  # every row exactly once
    assert got == _texts(tmp_path / "tp1")


@pytest.mark.slow  # CLI subprocesses: several engine start-ups
def test_externally_launched_group_torchrun_runs_the_job(tmp_path, text_model_dir):
    """torchrun starts both ranks; rank 1's `batchgen run` only serves rank 0's engine."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.job.conftest import REPO, run_cli

    job = _job(tmp_path, text_model_dir, "ext", 2, 4)
    port = _free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "batchgen",
                           "run", "-q", str(job)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = run_cli("run", "-q", str(_job(tmp_path, text_model_dir, "ref", 1, 4)))
    assert reference.returncode == 0, reference.stderr
    assert _texts(tmp_path / "ext") == _texts(tmp_path / "ref")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _orphaned_ranks(marker: str, wait: float) -> list[int]:
    """Rank processes (python -m batchgen.distributed.worker) with `marker` in their environment still alive
    after `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                env = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if b"batchgen.distributed.worker" in cmd and marker.encode() in env:
                found.append(int(pid))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
