"""The AMX bf16 linear kernel (kernels/cpu_amx_linear.py) against fp32 torch: every output within one
bf16 rounding of the exact fp32 result and nearly all equal to it (only fp32 summation order differs),
the fused SwiGLU epilogue against the two-op path, and the packed layers the models use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchgen.kernels import cpu_amx_linear as amx
from batchgen.kernels import cpu_ops

pytestmark = pytest.mark.skipif(not amx.available(), reason="this CPU (or build) has no AMX-BF16")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(rows: int, out: int, inp: int, bias: bool, seed: int):
    g = _gen(seed)
    x = torch.randn(rows, inp, generator=g).to(torch.bfloat16)
    w = (torch.randn(out, inp, generator=g) * inp ** -0.5).to(torch.bfloat16)
    b = torch.randn(out, generator=g).to(torch.bfloat16) if bias else None
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())  # fp32: exact products, fp32 sums
    assert torch.equal(exact.to(torch.bfloat16), amx.linear_ref(x, w, b))
    return x, w, b, exact


def _assert_one_rounding(out: torch.Tensor, exact: torch.Tensor) -> None:
    """out is exact rounded to bf16, but where another fp32 summation order lands across a rounding
    boundary (then one bf16 ulp away)."""
    rounded = exact.to(torch.bfloat16)
    torch.testing.assert_close(out.float(), rounded.float(), atol=1e-6, rtol=2 ** -7)
    if out.numel():
        assert (out == rounded).float().mean() > 0.995


# rows: one tile, a partial tile, several row groups, more than one 256-row block; out: one panel
# alone, an odd panel count (a pair and a single), the embedded model's q/k/v; in: one k-step, 576, 1536.
@pytest.mark.parametrize("rows", [0, 1, 15, 16, 33, 64, 130, 300])
@pytest.mark.parametrize("out,inp", [(16, 32), (48, 64), (960, 576), (576, 1536)])
def test_linear_within_one_rounding_of_fp32(rows, out, inp):
    x, w, b, exact = _case(rows, out, inp, bias=True, seed=rows * 7 + out)
    y = amx.linear(x, amx.pack(w), b.float(), out)
    assert y.shape == (rows, out) and y.dtype == torch.bfloat16
    _assert_one_rounding(y, exact)
    no_bias = amx.linear(x, amx.pack(w), None, out)
    _assert_one_rounding(no_bias, exact - b.float())


def test_linear_strided_input_and_two_threads():
    """A row-strided input (a view of a wider buffer) and two threads splitting an odd panel count."""
    g = _gen(3)
    wide = torch.randn(70, 640, generator=g).to(torch.bfloat16)
    x = wide[:, :576]
    w = (torch.randn(16 * 7, 576, generator=g) * 0.04).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = amx.linear(x, amx.pack(w), None, w.shape[0])
    finally:
        torch.set_num_threads(threads)
    _assert_one_rounding(y, F.linear(x.float(), w.float()))


@pytest.mark.parametrize("rows", [1, 17, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_projection_and_fused_silu_mul(rows, bias):
    inter, inp = 96, 576
    x, w, b, exact = _case(rows, 2 * inter, inp, bias, seed=rows + 1000 * bias)
    packed = amx.pack_gate_up(w)
    bf = None if b is None else b.float()
    projection = amx.gate_up(x, packed, bf, inter, silu_mul=False)
    _assert_one_rounding(projection, exact)
    # the same sums as the plain layout's (one k order per column), so the same bits
    assert torch.equal(projection, amx.linear(x, amx.pack(w), bf, 2 * inter))
    fused = amx.gate_up(x, packed, bf, inter, silu_mul=True)
    assert fused.shape == (rows, inter)
    two_op = cpu_ops.silu_mul(projection)  # the unfused path's roundings
    torch.testing.assert_close(fused.float(), two_op.float(), atol=1e-6, rtol=2 ** -7)
    assert (fused == two_op).float().mean() > 0.999
    reference = amx.gate_up_ref(x, w, b, silu_mul=True)  # torch's F.silu(gate) * up
    torch.testing.assert_close(fused.float(), reference.float(), atol=1e-2, rtol=2 ** -6)


def test_silu_mul_epilogue_over_the_whole_range():
    """Gate values from -100 to 100 (exp's clamp and overflow ends, SiLU's two tails) through the
    epilogue: an identity-like input picks each gate column exactly."""
    inter = 32
    gate_values = torch.linspace(-100, 100, 16 * inter).view(16, inter)
    x = torch.zeros(16, 32)
    x[:, 0] = 1.0  # every row reads weight column 0
    w = torch.zeros(2 * inter, 32)
    y = []
    for r in range(16):
        w[:inter, 0] = gate_values[r]
        w[inter:, 0] = 1.0  # up = 1
        y.append(amx.gate_up(x[r:r + 1].bfloat16(), amx.pack_gate_up(w.bfloat16()), None, inter, silu_mul=True))
    expected = F.silu(gate_values.bfloat16().float()).bfloat16()
    torch.testing.assert_close(torch.cat(y).float(), expected.float(), atol=0, rtol=2 ** -7)


def test_packed_layers_pick_the_kernel():
    from batchgen.models.packed_linear import PackedGateUp, PackedLinear

    g = _gen(9)
    w = (torch.randn(192, 576, generator=g) * 0.04).to(torch.bfloat16)
    b = torch.randn(192, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 576, generator=g).to(torch.bfloat16)
    layer = PackedLinear(w, b)
    assert layer.backend == "amx" and (layer.in_features, layer.out_features) == (576, 192)
    exact = F.linear(x.float(), w.float(), b.float())
    _assert_one_rounding(layer(x), exact)
    assert PackedGateUp.applies(w)
    gate_up = PackedGateUp(w, b)
    assert torch.equal(gate_up(x), layer(x))
    assert torch.equal(gate_up.silu_mul(x), amx.gate_up(x, amx.pack_gate_up(w), b.float(), 96, silu_mul=True))
    # shapes the tiles cannot take stay on oneDNN
    odd = PackedLinear(torch.randn(100, 70).to(torch.bfloat16))
    assert odd.backend == "onednn" and not PackedGateUp.applies(torch.randn(48, 64).to(torch.bfloat16))
