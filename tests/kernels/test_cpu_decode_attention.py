"""The C++ CPU decode-attention kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

from batchgen.kernels.cpu_decode_attention import decode_attention, decode_attention_ref, load

pytestmark = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernel here")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 3), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("d", [32, 64, 128])  # 64 and 128 have compile-time specializations
def test_matches_reference(dtype, tol, heads, kv_heads, block_size, d):
    gen = torch.Generator().manual_seed(heads * block_size)
    rows, num_blocks = 7, 40
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    ctx = torch.tensor([1, block_size - 1, block_size, block_size + 1, 3 * block_size, 2, 5 * block_size - 3])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:5] for _ in range(rows)])
    q = torch.randn(rows, heads, d, generator=gen).to(dtype)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 0.17)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.17)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (16, 2), (7, 7)])  # 3, 8 and 1 query heads per KV head
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [0, 300])
def test_long_contexts_match_reference(heads, kv_heads, d, window):
    """Contexts across several softmax chunks (the bf16 pass merges one chunk of 256 tokens at a
    time), blocks of 8 tokens, more heads per KV head than one register pass holds (8 > 4 at
    head_dim 64), a sliding window that starts mid-block."""
    gen = torch.Generator().manual_seed(heads + d + window)
    rows, block_size, num_blocks = 4, 8, 400
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    ctx = torch.tensor([255, 257, 700, 97 * block_size])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:97] for _ in range(rows)])
    q = (3 * torch.randn(rows, heads, d, generator=gen)).to(torch.bfloat16)  # peaked softmax: rescales matter
    out = decode_attention(q, k_cache, v_cache, tables, ctx, d ** -0.5, window)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, d ** -0.5, window)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_queries_as_a_view_of_the_qkv_projection(dtype):
    """q as the model hands it over: a view of the fused [tokens, q + k + v] projection (row stride
    960, not heads * d), read in place; the same bits as from a contiguous copy."""
    gen = torch.Generator().manual_seed(11)
    rows, heads, kv_heads, d, block_size, num_blocks = 5, 9, 3, 64, 16, 30
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    ctx = torch.tensor([1, 17, 40, 64, 80])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:5] for _ in range(rows)])
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    q = qkv[:, :heads * d].view(rows, heads, d)
    assert not q.is_contiguous()
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 0.125)
    assert torch.equal(out, decode_attention(q.contiguous(), k_cache, v_cache, tables, ctx, 0.125))
    ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    # heads not contiguous within a row: taken through a copy
    swapped = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(decode_attention(swapped, k_cache, v_cache, tables, ctx, 0.125), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_thread_split_changes_no_bit(dtype):
    """Jobs go to threads in ranges of equal keys (rows sorted by context, as a decode step hands
    them over: the split falls mid-batch, not at its count's middle): every thread count gives the
    same bits, and the reference's result."""
    gen = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, d, block_size, num_blocks = 23, 9, 3, 64, 16, 200
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    ctx = torch.sort(torch.randint(1, 40 * block_size, (rows,), generator=gen)).values
    ctx[-1] = 60 * block_size  # one long row: a range may hold a single job
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:60] for _ in range(rows)])
    q = torch.randn(rows, heads, d, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            outs.append(decode_attention(q, k_cache, v_cache, tables, ctx, 0.125))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0].float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("group", [1, 3, 4, 8, 15])  # query heads per KV head: the small-group pass's nq
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_amx_small_group_pass_equals_the_bf16_pass_and_the_reference(amx_pass, group, d, block_size):
    """Decode rows on AMX CPUs take the small-group pass (scores on tiles nq columns wide, softmax
    on the packed [tokens, nq] scores, P rounded to bf16 for P @ V): contexts of 1 token, partial
    tiles, tiles across two 8-token blocks, more than one 256-token softmax chunk, a sliding window;
    against the reference and the bf16 pass (set_amx(False), P in fp32)."""
    gen = torch.Generator().manual_seed(group * d + block_size)
    kv_heads, num_blocks = 2, 2 * 700 // block_size
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    ctx = torch.tensor([1, 15, 16, 33, 256, 257, 600])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:-(-600 // block_size)] for _ in ctx])
    q = (3 * torch.randn(len(ctx), group * kv_heads, d, generator=gen)).to(torch.bfloat16)  # peaked: rescales matter
    for window in (0, 100):
        out = decode_attention(q, k_cache, v_cache, tables, ctx, d ** -0.5, window)
        ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, d ** -0.5, window)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        amx_pass.set_amx(False)
        bf16_pass = decode_attention(q, k_cache, v_cache, tables, ctx, d ** -0.5, window)
        amx_pass.set_amx(True)
        torch.testing.assert_close(out.float(), bf16_pass.float(), atol=1e-2, rtol=1e-2)
