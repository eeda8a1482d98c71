"""The C++ CPU fused ops (kernels/cpu_ops.py) against the torch references they share with the
Triton kernels, and the packed oneDNN linear against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchgen.kernels import cpu_ops
from batchgen.kernels.rms_norm import rms_norm_ref
from batchgen.kernels.rotary import rotary_embedding_ref

pytestmark = pytest.mark.skipif(cpu_ops.load() is None, reason="no C++ compiler for the CPU kernels here")

DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [48, 576, 1000])
def test_rms_norm(dtype, with_residual, hidden):
    g = _gen(hidden)
    # Rows strided (a view of a wider buffer), as a fused projection's slices are.
    x = torch.randn(9, hidden + 16, generator=g).to(dtype)[:, :hidden]
    residual = torch.randn(9, hidden, generator=g).to(dtype) if with_residual else None
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    out = cpu_ops.rms_norm(x, weight, 1e-6, residual)
    ref = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)  # the residual add rounds like torch's
        out, ref = out[0], ref[0]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    if dtype == torch.bfloat16:  # fp32 statistics then one rounding: all but rare last-bit ties agree
        assert (out != ref).float().mean() < 0.01


def test_bf16_rounding_matches_torch_on_special_values():
    """The bf16 rounding (the CPU's instruction where it has AVX512-BF16, with NaNs and denormals
    on the integer path) against torch's add, through rms_norm's residual sum: NaN, infinities,
    overflow to infinity, denormal sums (kept, not flushed to zero) and sums exactly halfway between
    two bf16 values (ties to even). Each kind in its own 16-lane vector, as the fast path decides
    per vector."""
    tiny = torch.finfo(torch.bfloat16).tiny
    pairs = [  # (x, r) per lane
        [(float("nan"), 0.0), (float("inf"), 0.0), (-float("inf"), 1.0), (3e38, 1e38), (-3e38, -1e38)],
        [(-tiny, tiny / 2), (tiny / 4, tiny / 8), (-tiny / 4, -tiny / 2), (tiny, -tiny / 64), (tiny / 128, 0.0)],
        [(1.0, 2 ** -8), (1.0 + 2 ** -7, 2 ** -8), (-1.0, -(2 ** -8)), (1.0, 2 ** -9), (256.0, 1.0), (0.0, -0.0)],
    ]
    x = torch.randn(3, 16, generator=_gen(3))
    r = torch.randn(3, 16, generator=_gen(4))
    for v, lanes in enumerate(pairs):
        for lane, (a, b) in enumerate(lanes):
            x[v, lane], r[v, lane] = a, b
    xb, rb = x.view(1, 48).bfloat16(), r.view(1, 48).bfloat16()
    _, residual = cpu_ops.rms_norm(xb, torch.ones(48, dtype=torch.bfloat16), 1e-6, rb)
    expected = xb + rb  # torch's add: the fp32 sum, rounded once
    assert (expected[0, 16:21] != 0).all() and (expected[0, 16:21].abs() < tiny).all()  # denormal sums
    number = ~expected.isnan()
    assert torch.equal(residual.isnan(), expected.isnan())
    assert torch.equal(residual.view(torch.int16)[number], expected.view(torch.int16)[number])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = torch.randn(17, 2 * 300, generator=_gen(1)).mul(4).to(dtype)
    out = cpu_ops.silu_mul(gate_up)
    ref = cpu_ops.silu_mul_ref(gate_up)
    assert out.shape == (17, 300)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (9, 3, 64), (8, 2, 128), (4, 2, 80)])  # 80: a partial vector
def test_rotary_in_place_on_qkv_views(dtype, heads, kv_heads, head_dim):
    g = _gen(heads * head_dim)
    tokens = 13
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    pos = torch.randint(0, 200, (tokens,), generator=g)
    freqs = torch.outer(torch.arange(200).float(), 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_ref, k_ref = rotary_embedding_ref(q, k, cos, sin, pos)
    cpu_ops.rotary_embedding_(q, k, cos, sin, pos)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    if dtype == torch.bfloat16:  # fp32 math then one rounding: all but rare last-bit ties agree
        assert (q != q_ref).float().mean() < 0.01 and (k != k_ref).float().mean() < 0.01
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_first_index_of_the_max(dtype):
    x = torch.randn(6, 49152, generator=_gen(2)).to(dtype)
    x[1, 7] = x[1, 40000] = 50.0  # tie: the first index wins, as torch.argmax
    x[2, :] = -float("inf")
    x[3, 4095:4097] = 60.0  # across the kernel's chunk boundary
    x[4, -1] = 70.0
    torch.testing.assert_close(cpu_ops.argmax(x), cpu_ops.argmax_ref(x), atol=0, rtol=0)
    assert cpu_ops.argmax(x[:0]).shape == (0,)


@pytest.mark.parametrize("rows", [0, 1, 64, 300])
def test_onednn_packed_linear_is_bit_identical(rows, monkeypatch):
    """The oneDNN-packed layer (AMX-capable CPUs take kernels/cpu_amx_linear.py instead: forced off here;
    tests/kernels/test_cpu_amx_linear.py checks that one)."""
    from batchgen.models import packed_linear
    from batchgen.models.packed_linear import PackedLinear, can_pack

    if not can_pack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("oneDNN bf16 linear unavailable on this CPU")
    monkeypatch.setattr(packed_linear, "_use_amx", lambda weight: False)
    g = _gen(rows)
    linear = torch.nn.Linear(576, 960, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(960, 576, generator=g))
        linear.bias.copy_(torch.randn(960, generator=g))
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    packed = PackedLinear(linear.weight, linear.bias)
    assert (packed.in_features, packed.out_features) == (576, 960) and packed.backend == "onednn"
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 64, 700])  # a decode step's rows; a prefill chunk (threads)
def test_store_kv_equals_the_reference_from_qkv_views(dtype, tokens):
    """Against kernels/store_kv.py's reference (index_copy_), negative slots skipped as it skips them."""
    from batchgen.kernels.store_kv import store_kv_ref

    gen = torch.Generator().manual_seed(tokens)
    kv_heads, d, slots_total = 3, 64, 64 * 16
    qkv = torch.randn(tokens, 9 * d + 2 * kv_heads * d, generator=gen).to(dtype)
    k = qkv[:, 9 * d:(9 + kv_heads) * d].view(tokens, kv_heads, d)  # strided rows, as the model hands them
    v = qkv[:, (9 + kv_heads) * d:].view(tokens, kv_heads, d)
    slots = torch.randperm(slots_total, generator=gen)[:tokens]
    slots[::7] = -1
    cache = torch.randn(2, 64, 16, kv_heads, d, generator=gen).to(dtype)
    expected = cache.clone()
    cpu_ops.store_kv(k, v, cache, slots)
    store_kv_ref(k, v, expected, slots)
    assert torch.equal(cache[0], expected[0]) and torch.equal(cache[1], expected[1])
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.store_kv(k, v, cache, torch.full_like(slots, slots_total))
