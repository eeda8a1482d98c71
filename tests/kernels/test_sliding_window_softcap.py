"""Sliding-window attention and attention-logit softcapping in the Triton paged attention and the
C++ CPU decode kernel, against their torch references."""

import pytest
import torch

from batchgen.kernels.cpu_decode_attention import decode_attention, decode_attention_ref
from batchgen.kernels.cpu_decode_attention import load as load_cpu_decode
from batchgen.kernels.paged_attention import paged_attention, paged_attention_ref
from tests.kernels.test_paged_attention import make_batch

ROWS = [(1, 5), (1, 40), (7, 7), (12, 50), (1, 100), (3, 35), (20, 20)]


@pytest.mark.parametrize("window,softcap", [(8, 0.0), (16, 0.0), (0, 5.0), (13, 3.0)])
@pytest.mark.parametrize("tiling", [(None, 64, None), (16, 16, 16)], ids=["default-tiles", "small-tiles"])
def test_paged_attention_window_softcap(device, window, softcap, tiling):
    q, cache, cu, ctx, tables = make_batch(ROWS, 4, 2, 32, 16, torch.float32, device, seed=window)
    q = q * 3  # large scores, so that the cap matters
    partition, block_m, block_n = tiling
    out = paged_attention(q, cache, cu, ctx, tables, 0.2, partition_size=partition, block_m=block_m,
                          block_n=block_n, window=window, softcap=softcap)
    ref = paged_attention_ref(q, cache, cu, ctx, tables, 0.2, window=window, softcap=softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    if window or softcap:  # the options change the result
        assert not torch.allclose(ref, paged_attention_ref(q, cache, cu, ctx, tables, 0.2), atol=1e-3)


@pytest.mark.skipif(load_cpu_decode() is None, reason="no C++ compiler for the CPU kernel here")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [1, 8, 17, 1000])
def test_cpu_decode_window(dtype, tol, window):
    gen = torch.Generator().manual_seed(window)
    k_cache = torch.randn(40, 16, 2, 64, generator=gen).to(dtype)
    v_cache = torch.randn(40, 16, 2, 64, generator=gen).to(dtype)
    ctx = torch.tensor([1, 15, 16, 17, 48, 2, 77])
    tables = torch.stack([torch.randperm(40, generator=gen)[:5] for _ in range(7)])
    q = torch.randn(7, 8, 64, generator=gen).to(dtype)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, 0.17, window)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, ctx, 0.17, window)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # the reference's window: the same as attending over the last `window` tokens alone
    r, c = 4, int(ctx[4])
    k = k_cache[tables[r, :3]].reshape(-1, 2, 64)[:c][-window:].float().repeat_interleave(4, 1)
    v = v_cache[tables[r, :3]].reshape(-1, 2, 64)[:c][-window:].float().repeat_interleave(4, 1)
    p = torch.einsum("hd,thd->ht", q[r].float() * 0.17, k).softmax(-1)
    torch.testing.assert_close(ref[r].float(), torch.einsum("ht,thd->hd", p, v), atol=tol, rtol=tol)
