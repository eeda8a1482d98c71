"""Shared-prefix (cascade) decode attention: the C++ and Triton kernels and the torch reference
against the plain decode attention reference (an independent oracle: one softmax per row)."""

from __future__ import annotations

import pytest
import torch

from batchgen.kernels.cascade_attention import (
    cascade_decode_attention_cpu,
    cascade_decode_attention_ref,
    cascade_decode_attention_triton,
)
from batchgen.kernels.cpu_decode_attention import decode_attention, decode_attention_ref, load

needs_cpp = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernel here")


def _case(heads, kv_heads, d, block_size, dtype, seed=0):
    """9 rows: two groups sharing 3 and 1 leading blocks (members in any order), 2 rows alone; the
    members' own suffixes differ in length (one ends on a block boundary, one a token past it)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks, max_blocks = 64, 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shared_a, shared_b, pool = perm[:3], perm[3:4], iter(perm[4:])
    bs = block_size
    rows = [  # (shared blocks, ctx)
        (shared_a, 3 * bs + 1), (shared_b, 2 * bs), (None, 5), (shared_a, 5 * bs - 2), (shared_b, bs + 3),
        (shared_a, 4 * bs), (None, 3 * bs + 7), (shared_a, 3 * bs + bs // 2), (shared_b, 6 * bs + 1),
    ]
    tables = []
    for shared, _ctx in rows:
        own = [next(pool) for _ in range(max_blocks - (len(shared) if shared else 0))]
        tables.append((shared or []) + own)
    tables = torch.tensor(tables)
    ctx = torch.tensor([c for _, c in rows])
    q = torch.randn(len(rows), heads, d, generator=gen).to(dtype)
    group_rows = torch.tensor([7, 0, 3, 5, 1, 4, 8])
    group_starts = torch.tensor([0, 4, 7])
    group_blocks = torch.tensor([3, 1])
    return q, k_cache, v_cache, tables, ctx, (group_rows, group_starts, group_blocks)


@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 32), (9, 3, 64), (8, 2, 128)])
def test_reference_equals_plain(heads, kv_heads, d):
    q, k, v, tables, ctx, groups = _case(heads, kv_heads, d, 16, torch.float32)
    torch.testing.assert_close(cascade_decode_attention_ref(q, k, v, tables, ctx, 0.2, *groups),
                               decode_attention_ref(q, k, v, tables, ctx, 0.2), atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 32), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cpu_kernel_equals_plain(dtype, tol, heads, kv_heads, d, block_size):
    q, k, v, tables, ctx, groups = _case(heads, kv_heads, d, block_size, dtype, seed=heads + d)
    out = cascade_decode_attention_cpu(q, k, v, tables, ctx, 0.15, *groups)
    torch.testing.assert_close(out.float(), decode_attention_ref(q, k, v, tables, ctx, 0.15).float(),
                               atol=tol, rtol=tol)
    # Against the plain C++ kernel on the same inputs: the same sums in another order.
    torch.testing.assert_close(out.float(), decode_attention(q, k, v, tables, ctx, 0.15).float(), atol=tol,
                               rtol=tol)


@needs_cpp
def test_cpu_kernel_reads_strided_queries_in_place():
    """q as a view of a wider [rows, q + k + v] buffer: the same bits as from a contiguous copy."""
    q, k, v, tables, ctx, groups = _case(9, 3, 64, 16, torch.bfloat16, seed=5)
    wide = torch.zeros(q.shape[0], q.shape[1] * q.shape[2] + 384, dtype=q.dtype)
    wide[:, :q.shape[1] * q.shape[2]] = q.reshape(q.shape[0], -1)
    view = wide[:, :q.shape[1] * q.shape[2]].view(q.shape)
    assert not view.is_contiguous()
    assert torch.equal(cascade_decode_attention_cpu(view, k, v, tables, ctx, 0.15, *groups),
                       cascade_decode_attention_cpu(q, k, v, tables, ctx, 0.15, *groups))


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_kernel_long_prefix_many_members(dtype, tol):
    """A 320-token shared prefix (more than one 256-token softmax chunk of the bf16 pass) over 40
    rows (more than the 32 members one shared-pass job holds), each row with its own suffix."""
    gen = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, d, bs, shared = 40, 9, 3, 64, 16, 20
    k = torch.randn(shared + rows * 2, bs, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(shared + rows * 2, bs, kv_heads, d, generator=gen).to(dtype)
    tables = torch.tensor([list(range(shared)) + [shared + 2 * r, shared + 2 * r + 1] for r in range(rows)])
    ctx = shared * bs + 1 + torch.arange(rows) % (2 * bs - 1)
    q = (2 * torch.randn(rows, heads, d, generator=gen)).to(dtype)
    groups = (torch.arange(rows).flip(0), torch.tensor([0, rows]), torch.tensor([shared]))
    out = cascade_decode_attention_cpu(q, k, v, tables, ctx, 0.125, *groups)
    torch.testing.assert_close(out.float(), decode_attention_ref(q, k, v, tables, ctx, 0.125).float(),
                               atol=tol, rtol=tol)


@needs_cpp
def test_cpu_kernel_rejects_bad_groups():
    q, k, v, tables, ctx, (rows, starts, blocks) = _case(4, 4, 32, 16, torch.float32)
    with pytest.raises(RuntimeError, match="two groups"):
        cascade_decode_attention_cpu(q, k, v, tables, ctx, 0.1, torch.tensor([0, 0]), torch.tensor([0, 2]),
                                     torch.tensor([1]))
    with pytest.raises(RuntimeError, match="reach past"):  # row 1 (ctx 2 blocks) cannot share 2 blocks
        cascade_decode_attention_cpu(q, k, v, tables, ctx, 0.1, torch.tensor([1, 4]), torch.tensor([0, 2]),
                                     torch.tensor([2]))


@needs_cpp
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
def test_cpu_plain_kernel_sliding_window(window):
    q, k, v, tables, ctx, _ = _case(9, 3, 64, 16, torch.float32, seed=window)
    torch.testing.assert_close(decode_attention(q, k, v, tables, ctx, 0.2, window),
                               decode_attention_ref(q, k, v, tables, ctx, 0.2, window), atol=1e-5, rtol=1e-5)
    if window < 16:  # the window changes the result (else the test would not test it)
        assert not torch.allclose(decode_attention(q, k, v, tables, ctx, 0.2, window),
                                  decode_attention(q, k, v, tables, ctx, 0.2), atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 32), (9, 3, 64)])
def test_triton_kernel_equals_plain(device, dtype, tol, heads, kv_heads, d):
    q, k, v, tables, ctx, groups = _case(heads, kv_heads, d, 16, dtype, seed=d)
    kv_cache = torch.stack([k, v]).to(device)
    ints = [t.to(torch.int32).to(device) for t in (tables, ctx, *groups)]
    out = cascade_decode_attention_triton(q.to(device), kv_cache, *ints[:2], 0.15, *ints[2:], max_group_rows=4)
    torch.testing.assert_close(out.float().cpu(), decode_attention_ref(q, k, v, tables, ctx, 0.15).float(),
                               atol=tol, rtol=tol)


def test_triton_kernel_chunks_and_no_groups(device):
    """Groups larger than a program's chunk of rows (block_r=2: several chunks per group), and no groups."""
    q, k, v, tables, ctx, groups = _case(4, 2, 32, 16, torch.float32, seed=3)
    kv_cache = torch.stack([k, v]).to(device)
    ints = [t.to(torch.int32).to(device) for t in (tables, ctx, *groups)]
    ref = decode_attention_ref(q, k, v, tables, ctx, 0.3)
    from batchgen.kernels.cascade_attention_triton import cascade_decode_attention
    out = cascade_decode_attention(q.to(device), kv_cache, *ints[:2], 0.3, *ints[2:], max_group_rows=4, block_r=2)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    empty = [torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device),
             torch.zeros(0, dtype=torch.int32, device=device)]
    out = cascade_decode_attention(q.to(device), kv_cache, *ints[:2], 0.3, *empty, max_group_rows=0)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size,shared", [(8, 37), (16, 20), (32, 3)])
def test_cpu_amx_shared_pass_equals_the_bf16_pass_and_the_reference(amx_pass, d, block_size, shared):
    """The shared pass on AMX tiles (groups of >= 16 queries): 17 and 40 members (query tiles left
    partly empty), shared prefixes of 296 / 320 / 96 tokens (a partial last tile, tiles across two
    8-token blocks, more than one softmax chunk), against the plain reference and the bf16 pass."""
    gen = torch.Generator().manual_seed(d + block_size)
    rows, heads, kv_heads = 57, 9, 3
    own = -(-3 * 16 // block_size)  # each row's own blocks
    k = torch.randn(shared + rows * own, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(shared + rows * own, block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    prefix = torch.randperm(shared + rows * own, generator=gen).tolist()
    tables = torch.tensor([prefix[:shared] + prefix[shared + r * own:shared + (r + 1) * own] for r in range(rows)])
    ctx = shared * block_size + 1 + torch.arange(rows) % (3 * 16 - 1)
    q = (2 * torch.randn(rows, heads, d, generator=gen)).to(torch.bfloat16)
    groups = (torch.randperm(rows, generator=gen), torch.tensor([0, 17, rows]), torch.tensor([shared, shared - 1]))
    out = cascade_decode_attention_cpu(q, k, v, tables, ctx, d ** -0.5, *groups)
    torch.testing.assert_close(out.float(), decode_attention_ref(q, k, v, tables, ctx, d ** -0.5).float(),
                               atol=2e-2, rtol=2e-2)
    amx_pass.set_amx(False)
    bf16_pass = cascade_decode_attention_cpu(q, k, v, tables, ctx, d ** -0.5, *groups)
    torch.testing.assert_close(out.float(), bf16_pass.float(), atol=1e-2, rtol=1e-2)


@needs_cpp
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_cpu_amx_chunk_attention_equals_the_reference_per_token(amx_pass, d, block_size):
    """Prefill chunks, causal, on AMX tiles: fresh prompts (one a single token, one past a 256-token
    softmax chunk), chunks after a cached prefix (block-aligned or not), more than 32 query tokens
    (two jobs), q a strided view of a fused projection; out's other rows stay untouched."""
    from batchgen.kernels.cpu_decode_attention import chunk_attention

    gen = torch.Generator().manual_seed(d + block_size)
    heads, kv_heads = 9, 3
    chunks = [(0, 1), (0, 300), (384, 28), (37, 70), (96, 33)]  # (first position, tokens)
    max_blocks = max(-(-(p + n) // block_size) for p, n in chunks)
    pool = torch.randperm(len(chunks) * max_blocks, generator=gen)
    k = torch.randn(len(pool), block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(len(pool), block_size, kv_heads, d, generator=gen).to(torch.bfloat16)
    tables = pool.view(len(chunks), max_blocks)
    tokens = sum(n for _, n in chunks)
    wide = torch.randn(tokens + 2, heads * d + 2 * kv_heads * d, generator=gen).to(torch.bfloat16)
    q = wide[2:, :heads * d].view(tokens, heads, d)  # rows 2.. of a [tokens, q + k + v] projection
    lens = torch.tensor([n for _, n in chunks])
    out = torch.full((tokens + 3, heads, d), 7.0, dtype=torch.bfloat16)[3:]  # 3 sentinel rows before
    chunk_attention(q, k, v, tables, lens.cumsum(0) - lens, lens, torch.tensor([p for p, _ in chunks]), d ** -0.5,
                    out)
    per_token_tables = torch.cat([tables[i:i + 1].expand(n, -1) for i, (_, n) in enumerate(chunks)])
    ctx = torch.cat([torch.arange(p + 1, p + n + 1) for p, n in chunks])
    ref = decode_attention_ref(q.contiguous(), k, v, per_token_tables, ctx, d ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(out._base[:3], torch.full((3, heads, d), 7.0, dtype=torch.bfloat16))
