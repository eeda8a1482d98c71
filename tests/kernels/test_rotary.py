"""rotary_embedding against its torch reference and batchgen's rotate_half RoPE."""

import pytest
import torch

from batchgen.kernels.rotary import rotary_embedding, rotary_embedding_ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def tables(max_pos, head_dim, dtype, device, theta=10000.0):
    """HF rotary tables: [max_pos, head_dim], the two halves repeat the frequencies."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 32), (9, 3, 64), (8, 2, 24)])
def test_rotary_matches_reference(device, dtype, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    tokens = 7
    # q and k as views of a fused qkv projection, as in the model
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    cos, sin = tables(100, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 2, 50, 99, 7, 7], device=device)
    qo, ko = rotary_embedding(q, k, cos, sin, positions)
    qr, kr = rotary_embedding_ref(q, k, cos, sin, positions)
    torch.testing.assert_close(qo.float(), qr.float(), **TOL[dtype])
    torch.testing.assert_close(ko.float(), kr.float(), **TOL[dtype])
    # in place: writes through the views into the fused buffer, other columns untouched
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    qi, ki = rotary_embedding(q, k, cos, sin, positions, inplace=True)
    assert qi is q and ki is k
    torch.testing.assert_close(q.float(), qr.float(), **TOL[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_rotary_reference_is_hf_rope():
    """HF's formula: q * cos + rotate_half(q) * sin."""
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos, sin = tables(64, 32, torch.float32, "cpu")
    pos = torch.tensor([3, 0, 63, 10, 11])
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    qr, kr = rotary_embedding_ref(q, k, cos, sin, pos)
    torch.testing.assert_close(qr, q * c + rotate_half(q) * s)
    torch.testing.assert_close(kr, k * c + rotate_half(k) * s)
