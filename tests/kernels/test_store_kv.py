"""store_kv against its torch reference."""

import pytest
import torch

from batchgen.kernels.store_kv import store_kv, store_kv_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads,head_dim", [(1, 16), (2, 32), (4, 24)])
def test_store_kv_matches_reference(device, dtype, block_size, kv_heads, head_dim):
    g = torch.Generator().manual_seed(kv_heads * 1000 + block_size)
    tokens, num_blocks, heads = 11, 6, 2 * kv_heads
    # k and v as views of one fused projection [tokens, (heads + 2 * kv_heads) * head_dim], as in the model
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[3] = -1  # padding: skipped
    slots = slots.to(device)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(device, dtype)
    expected = cache.clone()
    store_kv(k, v, cache, slots)
    store_kv_ref(k, v, expected, slots)
    assert torch.equal(cache, expected)


def test_store_kv_int32_slots_and_empty(device):
    cache = torch.zeros(2, 4, 16, 2, 16, device=device)
    k = torch.randn(3, 2, 16, device=device)
    v = torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([0, 17, 63], dtype=torch.int32, device=device)
    store_kv(k, v, cache, slots)
    assert torch.equal(cache[0, 0, 0], k[0]) and torch.equal(cache[1, 1, 1], v[1])
    assert torch.equal(cache[0, 3, 15], k[2]) and torch.equal(cache[1, 3, 15], v[2])
    assert int((cache != 0).sum()) == 3 * 2 * 2 * 16
    store_kv(k[:0], v[:0], cache, slots[:0])  # no tokens: no launch
