"""fused_moe (Triton grouped GEMMs over expert-sorted rows) and the torch expert-sorted path against
the per-pick reference."""

import pytest
import torch
import torch.nn.functional as F

from batchgen.kernels.fused_moe import align_by_expert, fused_moe, fused_moe_ref, fused_moe_torch

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _case(tokens, experts, k, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    if experts > 2:  # one expert gets no row at all
        ids = torch.where(ids == experts - 1, 0, ids)
        ids[:, 1:] = torch.where(ids[:, 1:] == ids[:, :1], (ids[:, :1] + 1) % (experts - 1), ids[:, 1:])
    return x, w13, w2, (weights / weights.sum(-1, keepdim=True)).to(device), ids.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [(1, 4, 2, 32, 16), (13, 4, 2, 48, 24), (37, 8, 3, 64, 40)])
def test_fused_moe_matches_reference(device, dtype, tokens, experts, k, hidden, inter):
    x, w13, w2, weights, ids = _case(tokens, experts, k, hidden, inter, dtype, device, seed=tokens)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def test_align_by_expert_layout():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    rows, block_expert = align_by_expert(ids, 4, block_m=2)
    # expert 0: rows 1, 4; expert 1: row 3 (+pad); expert 2: rows 0, 2, 5 (+pad); expert 3: none
    assert rows.tolist()[:8] == [1, 4, 3, 6, 0, 2, 5, 6]
    assert block_expert.tolist()[:4] == [0, 1, 2, 2]
    assert set(rows.tolist()[8:]) <= {6}  # spare tiles (the bound needs no host sync) hold only padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_expert_sorted_path_matches_reference(dtype):
    x, w13, w2, weights, ids = _case(29, 8, 2, 64, 32, dtype, "cpu", seed=3)
    out = fused_moe_torch(x, weights, ids, 8, lambda e, r: F.linear(r, w13[e]), lambda e, h: F.linear(h, w2[e]),
                          lambda gu: F.silu(gu[:, :32]) * gu[:, 32:])
    torch.testing.assert_close(out.float(), fused_moe_ref(x, w13, w2, weights, ids).float(), **TOL[dtype])
