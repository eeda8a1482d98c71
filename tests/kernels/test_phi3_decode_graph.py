"""Phi-3 longrope on the CUDA-graph decode path: the per-row short/long choice is tensor ops on the
attention metadata (no host sync), so Phi-3 decodes under CUDA graphs; here with Triton attention
under the interpreter and the graph buffers replayed eagerly (capture=False)."""

from __future__ import annotations

import pytest

from batchgen import LLM, SamplingParams
from tests.conftest import assert_greedy_match, hf_greedy
from tests.test_models_phi3 import MAX_NEW, _hf_incremental
from tests.tiny_models import hf_model, make_tiny, prompts


@pytest.mark.slow  # Triton attention under the interpreter: about 30 s on 2 shared cores
def test_phi3_longrope_decode_graph_path(tmp_path, smol_dir):
    """The CUDA-graph decode path (static buffers, padding rows; replayed eagerly here: capture=False)
    with Triton attention: the short/long choice is made on the device from the per-row context
    lengths, and the rows still match HF, crossing rows included."""
    from batchgen.exec.cuda_graphs import DecodeGraphs

    model_dir = make_tiny(tmp_path, smol_dir, "phi3_longrope")
    short, crossing = prompts(2, seed=41, max_len=15), [list(range(60, 88))]
    long = [p for p in prompts(6, seed=42, max_len=70) if len(p) > 33][:1]
    hf = hf_model(model_dir)
    theirs = hf_greedy(model_dir, short + long, MAX_NEW, model=hf) + [_hf_incremental(hf, p, MAX_NEW) for p in crossing]
    llm = LLM(model_dir, dtype="float32", device="cpu", attention_backend="triton", max_num_seqs=4)
    engine = llm.engine
    graphs = DecodeGraphs(engine.model, engine.kv_caches, 4, engine.max_model_len, engine.block_size,
                          engine.kv.num_blocks, engine.device, capture=False)
    used = []
    run = graphs.run
    graphs.run = lambda input_ids, *a: (used.append(input_ids.shape[0]), run(input_ids, *a))[1]
    engine.runner.graphs = graphs
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(short + long + crossing, params, use_tqdm=False)]
    assert used  # decode steps went through the graph buffers
    assert_greedy_match(model_dir, short + long + crossing, ours, theirs, hf_model=hf)
