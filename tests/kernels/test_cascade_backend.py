"""Cascade attention through both attention backends on a prepared mixed batch: one-token rows
sharing leading blocks (grouped by ModelRunner.prepare) plus a prefill chunk; the same output as
with cascade off."""

import pytest
import torch

from batchgen import SamplingParams
from batchgen.exec import attention, attention_triton
from batchgen.exec.model_runner import ModelRunner
from batchgen.sched.output import ScheduledRequest, SchedulerOutput


def _row(i, start, n, blocks):
    return ScheduledRequest(str(i), list(range(3, 3 + n)), start, blocks, True, SamplingParams(), None, 0)


def _prepare(rows, device, backend, cascade_min_blocks=4):
    runner = ModelRunner(None, [], 16, torch.device(device), 0)
    runner.attention_backend = backend
    runner.cascade_min_blocks = cascade_min_blocks
    return runner.prepare(SchedulerOutput(rows))[2]


def test_cascade_equals_plain_in_both_backends(device):
    bs = 16
    shared = [30, 31, 32, 33, 34]
    rows = [_row(0, 5 * bs + 2, 1, shared + [1]), _row(1, 4 * bs + 9, 1, shared[:4] + [2, 3]),
            _row(2, 20, 1, [4, 5]), _row(3, 6 * bs, 1, shared + [6, 7]),  # its query opens block 7
            _row(4, 0, 19, [8, 9])]  # a prefill chunk after the one-token rows
    meta = _prepare(rows, device, "triton")
    assert meta.cascade is not None and meta.cascade.blocks.tolist() == [4]
    assert sorted(meta.cascade.rows.tolist()) == [0, 1, 3]
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, tokens = 6, 2, 16, 23
    q = torch.randn(tokens, heads, d, generator=g).to(device)
    k = torch.randn(tokens, kv_heads, d, generator=g).to(device)
    v = torch.randn(tokens, kv_heads, d, generator=g).to(device)
    cache = torch.randn(2, 40, bs, kv_heads, d, generator=g).to(device)
    plain = attention_triton.paged_attention(q, k, v, cache.clone(), _prepare(rows, device, "triton", 0), d ** -0.5)
    out = attention_triton.paged_attention(q, k, v, cache.clone(), meta, d ** -0.5)
    torch.testing.assert_close(out, plain, atol=2e-5, rtol=2e-5)
    if device == "cpu":
        torch_meta = _prepare(rows, device, "torch")
        if not ModelRunner(None, [], 16, torch.device("cpu"), 0).cpu_decode_kernel:
            pytest.skip("no C++ CPU kernels here: the torch backend has no cascade path")
        assert torch_meta.cascade is not None
        torch.testing.assert_close(attention.paged_attention(q, k, v, cache.clone(), torch_meta, d ** -0.5), plain,
                                   atol=2e-5, rtol=2e-5)
