"""MoE models (Qwen3-MoE, Mixtral, Qwen2-MoE): greedy fp32 output equals HF `generate`, from the
per-expert checkpoints save_pretrained writes and from stacked-expert ones; the CPU expert path
(the C++ kernel, packed bf16) against the per-pick reference; LoRA refused on expert weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from batchgen import LLM, SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.tiny_models import hf_model, make_tiny, prompts

MAX_NEW = 10


def _ours(model_dir, prompts, max_new=MAX_NEW, **engine):
    llm = LLM(model_dir, dtype="float32", **engine)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, smol_dir):
    made = {}

    def make(arch, **override):
        key = (arch, tuple(sorted(override.items())))
        if key not in made:
            made[key] = make_tiny(tmp_path_factory.mktemp(arch), smol_dir, arch, **override)
        return made[key]
    return make


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_moe_unnorm", "mixtral", "qwen2_moe"])
def test_moe_matches_hf(arch, moe_dirs):
    model_dir = moe_dirs(arch)
    ps = prompts(5, seed=11)
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, ps, MAX_NEW, model=hf)
    ours, _ = _ours(model_dir, ps)
    assert_greedy_match(model_dir, ps, ours, theirs, hf_model=hf)


def test_moe_chunked_preempted_prefix_hits_match_hf(moe_dirs):
    model_dir = moe_dirs("qwen3_moe")
    ps = prompts(6, seed=5)
    ps += [ps[0][:40] + p for p in prompts(3, seed=6)]  # shared prefixes hit the cache
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, ps, MAX_NEW, model=hf)
    draft = dict(speculative=dict(method="draft", draft_model=model_dir, num_speculative_tokens=3))
    for engine in (dict(max_num_batched_tokens=7), dict(num_kv_blocks=14, block_size=16, max_model_len=128), draft):
        ours, stats = _ours(model_dir, ps, **engine)
        assert_greedy_match(model_dir, ps, ours, theirs, hf_model=hf)
        assert stats["preemptions"] > 0 or "num_kv_blocks" not in engine
        if "speculative" in engine:  # the draft is the target itself: every proposal is accepted
            assert stats["spec_acceptance_rate"] > 0.9
        assert stats["cached_prompt_tokens"] > 0


def test_stacked_expert_checkpoint_loads_the_same(moe_dirs, tmp_path):
    """transformers' in-memory layout (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    import shutil

    model_dir = moe_dirs("qwen3_moe")
    hf = hf_model(model_dir)
    stacked = tmp_path / "stacked"
    shutil.copytree(model_dir, stacked)
    (stacked / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, stacked / "model.safetensors", metadata={"format": "pt"})
    ps = prompts(3, seed=2)
    assert _ours(str(stacked), ps)[0] == _ours(model_dir, ps)[0]


def test_missing_expert_is_named(moe_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    model_dir = moe_dirs("mixtral")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing expert tensors for \['model.layers.1.mlp.w2'\]"):
        LLM(str(broken), dtype="float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_experts_match_reference(moe_dirs, dtype):
    """SparseMoE's CPU paths against the per-pick reference: the C++ kernel (kernels/cpu_moe.py,
    where it builds; it repacks on the first forward and drops the dense stacks), and in bf16 the
    oneDNN-packed GEMMs where oneDNN packs bf16."""
    from batchgen.kernels import cpu_moe
    from batchgen.kernels.fused_moe import fused_moe_ref
    from batchgen.models.moe import SparseMoE, route
    from batchgen.models.packed_linear import can_pack

    torch.manual_seed(0)
    moe = SparseMoE(64, 32, 8, 2, renormalize=True).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    x = torch.randn(37, 64, dtype=dtype)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        weights, ids = route(moe.gate(x), 2, True)
        ref = fused_moe_ref(x, state["w13"], state["w2"], weights, ids)
        plain = moe(x)
        torch.testing.assert_close(plain.float(), ref.float(), **tol)
        if cpu_moe.load() is not None:
            assert moe.panels is not None and moe.w13.numel() == 0  # the kernel ran; dense stacks dropped
        if dtype == torch.bfloat16 and can_pack(x.device, x.dtype):  # fp32 experts are never oneDNN-packed
            packed = SparseMoE(64, 32, 8, 2, renormalize=True).to(dtype)
            packed.load_state_dict(state)
            packed.pack_for_cpu()
            assert packed.w13.numel() == 0  # the dense stacks are dropped
            torch.testing.assert_close(packed(x).float(), ref.float(), **tol)


def test_lora_attention_only_and_expert_targets_refused(moe_dirs, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = moe_dirs("qwen3_moe")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    llm = LLM(model_dir, dtype="float32", lora_adapters={"a": str(tmp_path / "lora")})
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with torch.no_grad():
        expected = peft.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert llm.generate([[5, 6, 7, 8]], params, use_tqdm=False, lora="a")[0].outputs[0].token_ids == expected
    cfg_path = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "gate_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="mixture of experts"):
        LLM(model_dir, dtype="float32", lora_adapters={"a": str(tmp_path / "lora")})


def test_sharded_checkpoint_with_index(moe_dirs, tmp_path):
    """save_pretrained's sharded layout (model.safetensors.index.json); a stray file is not read."""
    import shutil

    model_dir = moe_dirs("mixtral")
    sharded = tmp_path / "sharded"
    shutil.copytree(model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    hf_model(model_dir).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    save_file({"junk": torch.zeros(1)}, sharded / "stray.safetensors")
    ps = prompts(3, seed=8)
    assert _ours(str(sharded), ps)[0] == _ours(model_dir, ps)[0]
