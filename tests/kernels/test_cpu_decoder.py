"""The C++ decode stack (kernels/cpu_decoder.py) against the model's layer-by-layer forward: every
decode step of a real generate runs both ways on the same inputs and must give the same bits.
Greedy parity with HF in bf16 (tests/test_model_parity.py, tests/test_cascade_parity.py) runs
through the stack too, since those engines take it."""

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.kernels import cpu_amx_linear, cpu_decoder

pytestmark = pytest.mark.skipif(not cpu_amx_linear.available() or cpu_decoder.load() is None,
                                reason="the stack needs the AMX linear kernel and a C++ build")


def checked(llm: LLM) -> list[bool]:
    """Wraps the model's forward: each step the stack takes is also run layer by layer and compared.
    Returns the list it appends to, per checked step: whether it had shared-prefix groups."""
    model = llm.engine.runner.model
    assert model.cpu_decoder is not None
    forward, seen = model.forward, []

    def both_ways(input_ids, positions, kv_caches, meta):
        out = forward(input_ids, positions, kv_caches, meta)
        if model._decode_in_one_call(meta):
            stack, model.cpu_decoder = model.cpu_decoder, None
            try:  # the layers write the same K/V into the same slots again
                ref = forward(input_ids, positions, kv_caches, meta)
            finally:
                model.cpu_decoder = stack
            assert torch.equal(out, ref)
            seen.append(meta.cascade is not None)
        return out

    model.forward = both_ways
    return seen


def test_stack_equals_the_layers_on_shared_prefixes(smol_dir):
    """The embedded model, rows over two shared 64-token prefixes: plain and cascade decode steps."""
    llm = LLM(smol_dir, dtype="bfloat16", max_num_seqs=8)
    seen = checked(llm)
    prefixes = [list(range(100, 164)), list(range(300, 364))]
    prompts = [prefixes[i % 2] + [500 + i, 600 + i] for i in range(6)] + [[7, 8, 9]]
    params = [SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert True in seen and False in seen, seen  # both kinds of step were checked


def test_stack_with_biases_and_tied_head(tiny_model_dir):
    """Qwen2: q/k/v biases (fp32, added in the linear's epilogue) and a tied LM head; head_dim 16."""
    llm = LLM(tiny_model_dir("qwen2"), dtype="bfloat16", cascade_attention=False)
    seen = checked(llm)
    llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                 use_tqdm=False)
    assert seen and not any(seen)


def test_stack_with_sliding_window_layers(tmp_path, smol_dir):
    """Qwen2 with a sliding window (12 tokens) on its second layer only: a step with shared-prefix
    groups takes the cascade kernel in the first layer and the windowed decode pass in the second."""
    from tests.tiny_models import make_tiny

    llm = LLM(make_tiny(tmp_path, smol_dir, "qwen2_window"), dtype="bfloat16")
    assert [layer.self_attn.window for layer in llm.engine.model.layers] == [0, 12]
    seen = checked(llm)
    prefix = list(range(10, 74))
    llm.generate([prefix + [100 + i] for i in range(4)], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                 use_tqdm=False)
    assert True in seen


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stack_only_for_plain_llama_layers(tiny_model_dir, arch):
    """Qwen3's q/k norm is not in the stack: its model keeps the layer-by-layer forward."""
    llm = LLM(tiny_model_dir(arch), dtype="bfloat16")
    assert (llm.engine.runner.model.cpu_decoder is None) == (arch == "qwen3")


def test_steps_with_chunks_take_the_layers(smol_dir):
    """A step with a multi-token chunk (a prefill beside decodes) is not one the stack runs."""
    llm = LLM(smol_dir, dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=64)
    model = llm.engine.runner.model
    kinds = []
    forward = model.forward

    def record(input_ids, positions, kv_caches, meta):
        kinds.append((bool(meta.chunks), model._decode_in_one_call(meta)))
        return forward(input_ids, positions, kv_caches, meta)

    model.forward = record
    llm.generate([[7] * 40, [8] * 90], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert (True, False) in kinds and (False, True) in kinds
    assert all(not (chunks and stack) for chunks, stack in kinds)
