"""Multi-LoRA on Phi-3, PEFT the oracle: adapters on the checkpoint's fused `qkv_proj` /
`gate_up_proj` (one A, one B over the concatenated outputs) and on `o_proj` / `down_proj`, made
with PEFT on a tiny random Phi-3, served with base-model rows in one batch on both CPU paths."""

from __future__ import annotations

import pytest

from batchgen import LLM, SamplingParams
from batchgen.lora.adapters import AdapterError, ProjectionDims, load_adapter
from tests.test_lora import MAX_TOKENS, check_rows, make_peft
from tests.tiny_models import make_tiny, prompts

ADAPTERS = {
    "qkv8": dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"]),
    "mlp4": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "down_proj"], use_rslora=True),
}
MAX_NEW = MAX_TOKENS  # what check_rows asks PEFT for


@pytest.fixture(scope="module")
def phi3_lora(smol_dir, tmp_path_factory):
    model_dir = make_tiny(tmp_path_factory.mktemp("phi3"), smol_dir, "phi3")
    peft_model, paths = make_peft(model_dir, tmp_path_factory.mktemp("phi3_adapters"), ADAPTERS, b_scale=2.0)
    llm = LLM(model_dir, dtype="float32", device="cpu", lora_adapters=paths, max_loras=2)
    return peft_model, paths, llm


@pytest.mark.slow  # PEFT generate per row, twice: about 30 s each on 2 shared cores
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_phi3_fused_adapters_match_peft(phi3_lora, path, monkeypatch):
    peft_model, _, llm = phi3_lora
    lora = llm.engine.lora
    monkeypatch.setattr(lora, "use_cpu_kernel", path == "kernel" and lora.use_cpu_kernel)
    ps = prompts(3, seed=51, max_len=30)
    plan = [(0, "qkv8"), (1, None), (2, "mlp4"), (0, None), (1, "qkv8"), (2, "qkv8"), (0, "mlp4"), (2, None)]
    rows = [(ps[i], name) for i, name in plan]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([p for p, _ in rows], params, use_tqdm=False, lora=[a for _, a in rows])
    assert all(o.error is None for o in outs), [o.error for o in outs]
    ours = [o.outputs[0].token_ids for o in outs]
    check_rows(peft_model, rows, ours)
    base = {i: t for (i, a), t in zip(plan, ours) if a is None}
    for name in ADAPTERS:  # each adapter changes the base model's output somewhere
        assert any(t != base[i] for (i, a), t in zip(plan, ours) if a == name), f"{name} changes nothing"


def test_fused_adapter_splits_into_targets_and_checks_shapes(phi3_lora):
    _, paths, llm = phi3_lora
    dims = ProjectionDims.of_model(llm.engine.model)
    adapter = load_adapter("mlp4", paths["mlp4"], dims, max_rank=8)
    assert adapter.targets == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    a_q, b_q, _ = adapter.weights[(0, "q_proj")]
    a_v, b_v, _ = adapter.weights[(0, "v_proj")]
    assert a_q is a_v and b_q.shape[0] == dims.dims["q_proj"][1] and b_v.shape[0] == dims.dims["v_proj"][1]
    wrong = ProjectionDims(dims.num_layers, {**dims.dims, "v_proj": (dims.dims["v_proj"][0], 1)})
    with pytest.raises(AdapterError, match=r"qkv_proj.*\(= .* \+ .* \+ 1: q_proj, k_proj, v_proj\)"):
        load_adapter("mlp4", paths["mlp4"], wrong, max_rank=8)
