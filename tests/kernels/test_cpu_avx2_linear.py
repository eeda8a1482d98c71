"""The AVX2 fp32 linear kernel (kernels/cpu_avx2_linear.py) against its semantics, computed apart: each
output one chain of fp32 fused multiply-adds over the inputs in order, then the bias (bit-equal), and
against float64 torch (fp32 round-off only); the packed layer the models use."""

from __future__ import annotations

import pytest
import torch

from batchgen.kernels import cpu_avx2_linear as avx2


def _runs_here() -> bool:
    module = avx2.load()
    return module is not None and bool(module.avx2_supported())


# The kernel runs on any AVX2 CPU; the models pick it only where avx2.available() (no AVX-512).
pytestmark = pytest.mark.skipif(not _runs_here(), reason="this CPU (or build) has no AVX2/FMA")


def _fma_chain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """acc = fma(x[:, k], w[:, k], acc) for k = 0, 1, ... in fp32, then acc + b. A product of two fp32
    values is exact in float64; the float64 sum rounded to fp32 is the fused multiply-add's single
    rounding except in double-rounding cases (~2^-29 per step; none at these seeds)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    xd, wd = x.double(), w.double()
    for k in range(x.shape[1]):
        acc = (acc.double() + xd[:, k, None] * wd[None, :, k]).float()
    return acc if b is None else acc + b


def _case(rows: int, out: int, inp: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inp, generator=g)
    w = torch.randn(out, inp, generator=g) * inp ** -0.5
    b = torch.randn(out, generator=g)
    return x, w, b


# rows: one, a partial register block, whole ones, several 144-row blocks; out: one panel, three,
# the embedded model's q/k/v and down projection; in: 1, 64, 576, 1536 and 2500 (two input blocks).
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 13, 64, 150, 300])
@pytest.mark.parametrize("out,inp", [(16, 1), (48, 64), (960, 576), (576, 1536), (32, 2500)])
def test_linear_is_the_fma_chain(rows, out, inp):
    if rows == 300 and inp >= 1536:
        rows = 170  # the reference is a Python loop over the inputs: keep the big shapes quick
    x, w, b = _case(rows, out, inp, seed=rows * 7 + out + inp)
    packed = avx2.pack(w)
    y = avx2.linear(x, packed, b, out)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    chain = _fma_chain(x, w, None)
    assert torch.equal(y, chain + b)
    assert torch.equal(avx2.linear(x, packed, None, out), chain)
    torch.testing.assert_close(y, avx2.linear_ref(x, w, b), atol=1e-5, rtol=1e-5)


def test_linear_strided_input_and_thread_counts():
    """A row-strided input (a view of a wider buffer) and a column-strided one give the contiguous
    result; 1 and 2 threads give the same bits (each output is one thread's one chain)."""
    x, w, b = _case(70, 16 * 7, 576, seed=3)
    packed = avx2.pack(w)
    wide = torch.zeros(70, 640)
    wide[:, :576] = x
    transposed = x.t().contiguous().t()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = avx2.linear(x, packed, b, w.shape[0])
        torch.set_num_threads(2)
        two = avx2.linear(x, packed, b, w.shape[0])
        strided = avx2.linear(wide[:, :576], packed, b, w.shape[0])
        column_strided = avx2.linear(transposed, packed, b, w.shape[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, strided) and torch.equal(one, column_strided)


def test_bad_inputs_are_refused():
    x, w, _ = _case(4, 32, 64, seed=5)
    packed = avx2.pack(w)
    with pytest.raises(RuntimeError, match="x must be fp32"):
        avx2.linear(x.double(), packed, None, 32)
    with pytest.raises(RuntimeError, match="does not match"):
        avx2.linear(x[:, :32], packed, None, 32)
    with pytest.raises(RuntimeError, match="bias must be fp32"):
        avx2.linear(x, packed, torch.zeros(16), 32)
    assert not avx2.supports(40, 64) and avx2.supports(48, 64)


@pytest.mark.skipif(not avx2.available(), reason="the models take this kernel only on AVX2 CPUs without AVX-512")
def test_packed_layer_picks_the_kernel():
    from batchgen.models.packed_linear import PackedLinear, can_pack

    if not can_pack(torch.device("cpu"), torch.float32):
        pytest.skip("fp32 layers are not packed on this CPU (Intel: MKL)")
    x, w, b = _case(40, 192, 576, seed=9)
    layer = PackedLinear(w, b)
    assert layer.backend == "avx2" and (layer.in_features, layer.out_features) == (576, 192)
    assert torch.equal(layer(x), avx2.linear(x, avx2.pack(w), b, 192))
    assert PackedLinear(torch.randn(100, 70)).backend == "onednn"  # out % 16 != 0
