"""The C++ MoE expert kernel (kernels/cpu_moe.py) against its torch reference, and that reference
against the Triton kernel's (kernels/fused_moe.py: the same semantics)."""

from __future__ import annotations

import pytest
import torch

from batchgen.kernels import cpu_moe
from batchgen.kernels.fused_moe import fused_moe_ref

pytestmark = pytest.mark.skipif(cpu_moe.load() is None, reason="no C++ compiler for the CPU kernels here")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(tokens, experts, k, hidden, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = torch.topk(torch.randn(tokens, experts, generator=g).softmax(-1), k)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [
    (64, 8, 2, 576, 768),  # W7's layer at a decode batch
    (29, 8, 2, 64, 32),  # rows per expert not a multiple of the 6-row tile
    (5, 4, 3, 40, 20),  # hidden and inter not multiples of 16 / 8 (padded panels), top-3
    (1, 16, 1, 48, 24),  # one token: 15 experts without rows
])
def test_moe_experts_match_reference(dtype, tokens, experts, k, hidden, inter):
    x, w13, w2, weights, ids = _case(tokens, experts, k, hidden, inter, dtype, seed=tokens)
    out = cpu_moe.moe_experts(x, *cpu_moe.pack_experts(w13, w2), weights, ids)
    ref = cpu_moe.moe_experts_ref(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_reference_is_the_fused_moe_semantics():
    x, w13, w2, weights, ids = _case(13, 4, 2, 32, 16, torch.float32, seed=1)
    torch.testing.assert_close(cpu_moe.moe_experts_ref(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids))


def test_strided_rows_and_bad_ids():
    x, w13, w2, weights, ids = _case(7, 4, 2, 32, 16, torch.float32, seed=2)
    packed = cpu_moe.pack_experts(w13, w2)
    wide = torch.zeros(7, 48)
    wide[:, :32] = x
    torch.testing.assert_close(cpu_moe.moe_experts(wide[:, :32], *packed, weights, ids),
                               cpu_moe.moe_experts(x, *packed, weights, ids))
    with pytest.raises(RuntimeError, match=r"expert id 4 out of range \[0, 4\)"):
        cpu_moe.moe_experts(x, *packed, weights, torch.full_like(ids, 4))
