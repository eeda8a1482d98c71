"""The Triton attention backend inside batchgen: metadata from ModelRunner.prepare, backend selection,
and greedy parity of whole engines (attention_backend="triton" vs "torch")."""

import pytest
import torch

from batchgen import LLM, SamplingParams
from batchgen.exec import attention, attention_triton
from batchgen.exec.model_runner import ModelRunner
from batchgen.sched.output import ScheduledRequest, SchedulerOutput


def _row(i, start, n, blocks, sample=True):
    return ScheduledRequest(str(i), list(range(3, 3 + n)), start, blocks, sample, SamplingParams(), None, 0)


@pytest.mark.parametrize("block_size", [16, 32])
def test_backend_matches_torch_backend_on_prepared_batch(device, block_size):
    """A batch as the scheduler makes it (decodes first, then a prefill from 0 and an extend after a
    cached prefix): both backends give the same output and leave the same cache."""
    bs = block_size
    blocks = torch.randperm(40, generator=torch.Generator().manual_seed(bs)).tolist()
    rows = [_row(0, 20, 1, blocks[0:2]),  # decode at position 20
            _row(1, 2 * bs, 1, blocks[2:5]),  # decode right after a block boundary
            _row(2, 0, 19, blocks[5:7]),  # prefill from position 0
            _row(3, bs + 5, 12, blocks[7:10], sample=False)]  # extend after a cached prefix
    runner = ModelRunner(None, [], bs, torch.device(device), 0)
    runner.attention_backend = "triton"
    _, _, meta, _ = runner.prepare(SchedulerOutput(rows))
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 21, 33]
    assert meta.context_lens.tolist() == [21, 2 * bs + 1, 19, bs + 17]
    assert meta.block_tables.dtype == torch.int32 and (meta.max_q_len, meta.max_context_len) == (19, 2 * bs + 1)

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, tokens = 6, 2, 16, 33
    q = torch.randn(tokens, heads, d, generator=g).to(device)
    k = torch.randn(tokens, kv_heads, d, generator=g).to(device)
    v = torch.randn(tokens, kv_heads, d, generator=g).to(device)
    cache = torch.randn(2, 40, bs, kv_heads, d, generator=g).to(device)  # the cached prefixes: random
    cache_ref = cache.clone()
    torch_runner = ModelRunner(None, [], bs, torch.device(device), 0)  # the torch backend's own metadata
    _, _, torch_meta, _ = torch_runner.prepare(SchedulerOutput(rows))
    assert meta.chunks == [] and meta.single_groups == []  # the Triton backend does not build them
    out = attention_triton.paged_attention(q, k, v, cache, meta, d ** -0.5)
    ref = attention.paged_attention(q, k, v, cache_ref, torch_meta, d ** -0.5)
    assert torch.equal(cache, cache_ref)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch_runner.cpu_decode_kernel = False  # one-token rows through masked SDPA groups instead
    _, _, sdpa_meta, _ = torch_runner.prepare(SchedulerOutput(rows))
    assert sdpa_meta.single_groups and sdpa_meta.single_groups[0].mask is not None
    torch.testing.assert_close(attention.paged_attention(q, k, v, cache_ref.clone(), sdpa_meta, d ** -0.5), ref,
                               atol=2e-5, rtol=2e-5)


def test_torch_metadata_has_no_triton_fields():
    runner = ModelRunner(None, [], 16, torch.device("cpu"), 0)
    _, _, meta, _ = runner.prepare(SchedulerOutput([_row(0, 0, 3, [1])]))
    assert meta.cu_seqlens_q is None and meta.block_tables is None
    with pytest.raises(ValueError, match="attention_backend"):
        attention_triton.paged_attention(torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), torch.zeros(3, 2, 16),
                                         torch.zeros(2, 2, 16, 2, 16), meta, 0.25)


def test_backend_selection(monkeypatch):
    from batchgen.config import EngineConfig
    from batchgen.engine import _pick_attention_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _pick_attention_backend("auto", cpu) == "torch"
    assert _pick_attention_backend("torch", cuda) == "torch"
    assert _pick_attention_backend("auto", cuda) == "triton"
    assert _pick_attention_backend("triton", cpu) == "triton"  # the kernels run interpreted here
    monkeypatch.setattr(attention_triton, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _pick_attention_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def _prompts():
    def ids(n, start):
        return [(start + 37 * i) % 500 + 3 for i in range(n)]

    shared = ids(40, 5)  # a prefix of more than two blocks: the later prompts hit the prefix cache
    return [ids(5, 1), ids(23, 2), shared + ids(6, 9), shared + ids(3, 11), ids(1, 4)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_greedy_parity_with_torch_backend(tiny_model_dir, arch):
    """Whole engine, fp32: the same greedy tokens with both backends, under a small token budget
    (chunked prefill: extends after a cached prefix, mixed decode + chunk steps) and prefix hits."""
    path = tiny_model_dir(arch)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, attention_backend=backend, dtype="float32", device="cpu", num_kv_blocks=64,
                  max_num_batched_tokens=24)
        assert llm.engine.attention_backend == backend
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]
        if backend == "triton":
            assert llm.stats()["prefix_cache_hit_rate"] > 0
    assert all(len(t) == 6 for t in outs["torch"])
    assert outs["triton"] == outs["torch"]


def _recording(run, sizes: list[int]):
    def wrapped(input_ids, *args):
        sizes.append(input_ids.shape[0])
        return run(input_ids, *args)
    return wrapped


def test_decode_graph_buffers_match_eager(tiny_model_dir):
    """The CUDA-graph decode path's static buffers and padding (here replayed eagerly: capture=False)
    give the eager engine's greedy tokens. Buckets of 1, 2, 4 rows with 3 and 5 live rows exercise
    padding rows on the null block, and an earlier bigger batch leaves stale rows in the buffers."""
    from batchgen.exec.cuda_graphs import DecodeGraphs, bucket_sizes

    assert bucket_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and bucket_sizes(256)[-1] == 256
    assert bucket_sizes(3) == [1, 2, 3] and bucket_sizes(12) == [1, 2, 4, 8, 12]
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    prompts = _prompts()
    outs = {}
    for graphs in (False, True):
        llm = LLM(path, attention_backend="triton", dtype="float32", device="cpu", num_kv_blocks=64,
                  max_num_batched_tokens=24, max_num_seqs=4)
        engine = llm.engine
        used = []
        if graphs:
            g = DecodeGraphs(engine.model, engine.kv_caches, 4, engine.max_model_len, engine.block_size,
                             engine.kv.num_blocks, engine.device, capture=False)
            g.run = _recording(g.run, used)
            engine.runner.graphs = g
        outs[graphs] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if graphs:
            assert 3 in used and 4 in used  # decode-only steps of 3 rows (padded to 4) and of 4 rows
        null = engine.kv.num_blocks  # padding rows wrote into the null block, and only padding rows do
        assert engine.kv_caches[0].shape[1] == null + 1
        assert (engine.kv_caches[0][:, null].abs().sum() > 0) == graphs
    assert outs[True] == outs[False]


def test_profile_forward_runs_at_the_token_budget(tiny_model_dir):
    """The GPU memory-sizing forward (one row of the whole token budget) runs through the real
    runner; only CUDA measures it, so on CPU it reports 0."""
    from batchgen.exec.model_runner import ModelRunner

    llm = LLM(tiny_model_dir("llama"), dtype="float32", device="cpu", num_kv_blocks=16)
    seen = []
    execute = ModelRunner.execute

    def recording(runner, sched):
        seen.append([r.num_tokens for r in sched.scheduled])
        return execute(runner, sched)

    ModelRunner.execute = recording
    try:
        assert llm.engine._profile_forward(40) == 0
    finally:
        ModelRunner.execute = execute
    assert seen == [[40]]  # one row of the whole budget went through the runner
