"""paged_attention (decode split-K + prefill/extend tiles, one entry point) against its torch reference."""

import math

import pytest
import torch

from batchgen.kernels.paged_attention import paged_attention, paged_attention_ref

# (heads, kv_heads, head_dim): GQA ratios 1, 2, 4, and 3 (non-power-of-two, as SmolLM2's 9/3)
HEAD_CONFIGS = [(4, 4, 16), (4, 2, 32), (8, 2, 16), (6, 2, 32)]
# (q_len, ctx) per row; ctx counts the row's cached tokens including this step's
SCENARIOS = {
    # contexts of 1, at, just before and just after block (16/32) and tile (16/64) boundaries
    "decode": [(1, 1), (1, 15), (1, 16), (1, 17), (1, 33), (1, 64), (1, 65), (1, 100)],
    "prefill": [(2, 2), (16, 16), (37, 37)],  # chunks from position 0, no cached prefix
    "extend": [(5, 20), (16, 48), (33, 70), (2, 3)],  # chunks after a cached prefix
    # decodes first (batchgen's order) and a decode after the chunks (any order works)
    "mixed": [(1, 9), (1, 40), (7, 7), (12, 50), (1, 1), (3, 35)],
}
# (partition_size, block_m, block_n): defaults, and small tiles that force several query tiles,
# several key tiles and several decode splits (with some splits past a row's context)
TILINGS = [(None, 64, None), (16, 16, 16)]


def make_batch(rows, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Random q and cache; each row's blocks are scattered through the pool, tables padded with 0."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(ctx / block_size) for _, ctx in rows]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 1
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n] + [0] * (width - n))
        i += n
    q_lens = [q for q, _ in rows]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    # q as a strided view of a fused projection (heads + 2 * kv_heads columns), as in the model
    qkv = torch.randn(cu[-1], (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv.to(device, dtype)[:, :heads * head_dim].view(cu[-1], heads, head_dim)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    i32 = dict(dtype=torch.int32, device=device)
    return (q, cache, torch.tensor(cu, **i32), torch.tensor([c for _, c in rows], **i32),
            torch.tensor(tables, **i32))


@pytest.mark.parametrize("tiling", TILINGS, ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_CONFIGS)
def test_paged_attention_matches_reference(device, heads, kv_heads, head_dim, block_size, scenario, tiling):
    rows = SCENARIOS[scenario]
    q, cache, cu, ctx, tables = make_batch(rows, heads, kv_heads, head_dim, block_size, torch.float32, device,
                                           seed=heads * 7 + block_size)
    scale = head_dim ** -0.5
    partition, block_m, block_n = tiling
    out = paged_attention(q, cache, cu, ctx, tables, scale, partition_size=partition, block_m=block_m,
                          block_n=block_n)
    ref = paged_attention_ref(q, cache, cu, ctx, tables, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (6, 2, 16)])
def test_paged_attention_half_precision(device, dtype, heads, kv_heads, head_dim):
    rows = SCENARIOS["mixed"]
    q, cache, cu, ctx, tables = make_batch(rows, heads, kv_heads, head_dim, 16, dtype, device, seed=3)
    out = paged_attention(q, cache, cu, ctx, tables, head_dim ** -0.5, partition_size=32, block_n=16)
    ref = paged_attention_ref(q, cache, cu, ctx, tables, head_dim ** -0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_paged_attention_host_maxima_out_and_padding(device):
    """max_q_len / max_context_len given by the host, out= given, and a table wider than needed."""
    rows = [(1, 30), (4, 4), (9, 41)]
    q, cache, cu, ctx, tables = make_batch(rows, 4, 2, 16, 16, torch.float32, device, seed=5)
    tables = torch.cat([tables, torch.zeros_like(tables)], 1)
    out = torch.full_like(q, float("nan"))
    res = paged_attention(q, cache, cu, ctx, tables, 0.3, max_q_len=9, max_context_len=41, out=out)
    assert res is out
    torch.testing.assert_close(out, paged_attention_ref(q, cache, cu, ctx, tables, 0.3), atol=2e-5, rtol=2e-5)


def test_paged_attention_decode_splits_past_context(device):
    """Long and short decode rows together: the short rows have no work in the later splits."""
    rows = [(1, 3), (1, 150), (1, 64), (1, 1)]
    q, cache, cu, ctx, tables = make_batch(rows, 8, 4, 16, 32, torch.float32, device, seed=9)
    ref = paged_attention_ref(q, cache, cu, ctx, tables, 0.25)
    for partition in (16, 48, 64, 160):
        out = paged_attention(q, cache, cu, ctx, tables, 0.25, partition_size=partition, block_n=16)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
