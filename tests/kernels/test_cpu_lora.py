"""The C++ CPU multi-LoRA kernel (kernels/cpu_lora.py) against its torch reference and a dense fp64
oracle, over the adapter popularity patterns of the Triton kernels' tests."""

from __future__ import annotations

import random

import pytest
import torch

from batchgen.kernels.cpu_lora import load, lora_delta_, lora_delta_ref
from tests.kernels.test_lora_kernels import NUM_SLOTS, PATTERNS, pattern_slots

pytestmark = pytest.mark.skipif(load() is None, reason="no C++ compiler for the CPU kernels here")

RANK = 8
RANKS = [8, 3, 0, 8, 1, 5]  # per slot; 0: the adapter does not target these projections
OUTS = [40, 16, 16]  # a fused projection of three targets (q, k, v)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make(pattern: str, dtype: torch.dtype, seed: int, in_f: int = 48):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = [1] * 6 + [rng.choice([2, 5, 17, 40]) for _ in range(8)]  # decodes and prefill chunks
    row_slots = pattern_slots(pattern, len(lens), rng)
    token_slots = torch.tensor([s for n, s in zip(lens, row_slots) for _ in range(n)])
    a = torch.zeros(NUM_SLOTS, RANK * len(OUTS), in_f)
    bs = [torch.zeros(NUM_SLOTS, RANK, out) for out in OUTS]
    for s, r in enumerate(RANKS):  # zero past each adapter's rank, as the engine's slots are
        for k, out in enumerate(OUTS):
            a[s, k * RANK:k * RANK + r] = torch.randn(r, in_f, generator=g) / in_f ** 0.5
            bs[k][s, :r] = torch.randn(r, out, generator=g)
    x = torch.randn(len(token_slots), in_f, generator=g)
    y = torch.randn(len(token_slots), sum(OUTS), generator=g)
    return x.to(dtype), y.to(dtype), a.to(dtype), [b.to(dtype) for b in bs], token_slots


@pytest.mark.parametrize("in_f", [48, 64], ids=["widened", "native"])  # bf16 x 64: AVX512-BF16 dots where built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_reference_and_oracle(pattern, dtype, in_f):
    x, y, a, bs, token_slots = make(pattern, dtype, seed=PATTERNS.index(pattern), in_f=in_f)
    offsets = [0, OUTS[0], OUTS[0] + OUTS[1]]
    ours, ref = y.clone(), y.clone()
    lora_delta_(x, ours, a, bs, offsets, token_slots, RANK)
    lora_delta_ref(x, ref, a, bs, offsets, token_slots, RANK)
    torch.testing.assert_close(ours.float(), ref.float(), **TOL[dtype])
    oracle = y.double().clone()  # per token, fp64: y += (A x) @ B, target by target
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            h = a[s].double() @ x[t].double()
            for k, (b, off) in enumerate(zip(bs, offsets)):
                oracle[t, off:off + b.shape[-1]] += h[k * RANK:(k + 1) * RANK] @ b[s].double()
    torch.testing.assert_close(ours.double(), oracle, **TOL[dtype])
    base = token_slots < 0
    assert torch.equal(ours[base], y[base])  # base-model tokens untouched


def test_strided_rows_and_a_subset_of_targets():
    """y as a view with row stride (the engine passes the fused projection's output), one target
    writing into the middle of it."""
    x, y, a, bs, token_slots = make("uniform", torch.float32, seed=9)
    wide = torch.zeros(y.shape[0], 200)
    view = wide[:, 10:10 + y.shape[1]]
    view.copy_(y)
    ref = y.clone()
    lora_delta_(x, view, a[:, RANK:2 * RANK].contiguous(), [bs[1]], [OUTS[0]], token_slots, RANK)
    lora_delta_ref(x, ref, a[:, RANK:2 * RANK].contiguous(), [bs[1]], [OUTS[0]], token_slots, RANK)
    torch.testing.assert_close(view, ref)
    assert wide[:, :10].abs().sum() == 0 and wide[:, 10 + y.shape[1]:].abs().sum() == 0
