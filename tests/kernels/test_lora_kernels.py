"""LoRA shrink/expand (SGMV) Triton kernels against their torch references, under TRITON_INTERPRET=1 on CPU
(and compiled on CUDA when a GPU is at hand), over adapter popularity patterns: all distinct, uniform,
zipf, identical, one adapter with most rows, rows without adapter. The references are themselves
checked against a per-token dense oracle."""

from __future__ import annotations

import random

import pytest
import torch

from batchgen.kernels.lora_shrink_expand import (
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
)
from tests.kernels.conftest import INTERPRETED  # the conftest decided: interpreted or compiled

DEVICE = "cpu" if INTERPRETED else "cuda"  # interpreted kernels take CPU tensors, compiled ones CUDA tensors
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="kernels compiled for CUDA, and no CUDA device")
NUM_SLOTS = 6
MAX_RANK = 16
RANKS = [8, 16, 4, 0, 1, 13]  # per slot; 0: the adapter does not target this projection


def pattern_slots(pattern: str, rows: int, rng: random.Random) -> list[int]:
    """Adapter slot of every row (-1: base model) for a popularity pattern."""
    if pattern == "distinct":
        return [i % NUM_SLOTS for i in range(rows)]
    if pattern == "uniform":
        return [rng.randrange(NUM_SLOTS) for _ in range(rows)]
    if pattern == "zipf":
        weights = [1 / (k + 1) ** 1.2 for k in range(NUM_SLOTS)]
        return rng.choices(range(NUM_SLOTS), weights, k=rows)
    if pattern == "identical":
        return [1] * rows
    if pattern == "one_hot":  # one adapter with most rows, a few others
        return [0 if rng.random() < 0.85 else rng.randrange(1, NUM_SLOTS) for _ in range(rows)]
    if pattern == "with_base":  # rows without adapter mixed in
        return [rng.choice([-1, -1, 2, 5, 3]) for _ in range(rows)]
    if pattern == "all_base":
        return [-1] * rows
    raise ValueError(pattern)


def make_batch(pattern: str, seed: int, sort: bool):
    """Rows of 1 token (decodes) and longer chunks (prefills); segments = runs of equal slots."""
    rng = random.Random(seed)
    rows = 14
    lens = [1] * 6 + [rng.choice([2, 5, 17, 40, 70]) for _ in range(rows - 6)]
    slots = pattern_slots(pattern, rows, rng)
    order = list(range(rows))
    if sort:  # the scheduler's order: decodes first, each group by slot
        order.sort(key=lambda i: (lens[i] != 1, slots[i]))
    seg_starts, seg_slots, tok = [0], [], 0
    for i in order:
        if seg_slots and seg_slots[-1] == slots[i]:
            seg_starts[-1] = tok + lens[i]
        else:
            seg_slots.append(slots[i])
            seg_starts.append(tok + lens[i])
        tok += lens[i]
    token_slot = [slots[i] for i in order for _ in range(lens[i])]
    return (torch.tensor(seg_starts, dtype=torch.int32, device=DEVICE),
            torch.tensor(seg_slots, dtype=torch.int32, device=DEVICE), token_slot, tok)


def make_weights(in_f: int, out_f: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(NUM_SLOTS, MAX_RANK, in_f)
    b = torch.zeros(NUM_SLOTS, out_f, MAX_RANK)
    for s, r in enumerate(RANKS):  # zero past each adapter's rank, as the engine's slots are
        a[s, :r] = torch.randn(r, in_f, generator=g) / in_f ** 0.5
        b[s, :, :r] = torch.randn(out_f, r, generator=g) / max(r, 1) ** 0.5
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), ranks


def dense_oracle(x, a, b, y, token_slot):
    """Per token: y[t] += x[t] @ A[w]^T @ B[w]^T (fp64, one token at a time)."""
    out = y.double().clone()
    for t, w in enumerate(token_slot):
        if w >= 0:
            out[t] += (x[t].double() @ a[w].double().T) @ b[w].double().T
    return out


PATTERNS = ["distinct", "uniform", "zipf", "identical", "one_hot", "with_base", "all_base"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_shrink_expand_match_reference(pattern, sort):
    in_f, out_total, out_f, offset = 48, 80, 40, 24
    seg_starts, seg_slots, token_slot, tokens = make_batch(pattern, seed=PATTERNS.index(pattern), sort=sort)
    dtype = torch.float32
    a, b, ranks = make_weights(in_f, out_f, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    # x a strided view (a column slice), y a column slice of a wider fused output
    x = torch.randn(tokens, in_f + 8, generator=g).to(DEVICE, dtype)[:, 4:4 + in_f]
    y_full = torch.randn(tokens, out_total, generator=g).to(DEVICE, dtype)
    y_orig, y_ref_full = y_full.clone(), y_full.clone()

    h = lora_shrink(x, a, seg_starts, seg_slots, ranks)
    h_ref = lora_shrink_ref(x, a, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    for t, w in enumerate(token_slot):  # untouched rows and columns past the rank stay zero
        if w < 0 or RANKS[w] == 0:
            assert not h[t].any()
        else:
            assert not h[t, RANKS[w]:].any()

    lora_expand(h, b, y_full[:, offset:offset + out_f], seg_starts, seg_slots, ranks)
    lora_expand_ref(h_ref, b, y_ref_full[:, offset:offset + out_f], seg_starts, seg_slots, ranks)
    torch.testing.assert_close(y_full, y_ref_full, **TOL[dtype])
    # columns outside the slice are untouched; inside it, the dense oracle
    torch.testing.assert_close(y_full[:, :offset], y_orig[:, :offset], atol=0, rtol=0)
    torch.testing.assert_close(y_full[:, offset + out_f:], y_orig[:, offset + out_f:], atol=0, rtol=0)
    oracle = dense_oracle(x, a, b, y_orig[:, offset:offset + out_f], token_slot)
    torch.testing.assert_close(y_full[:, offset:offset + out_f].double(), oracle, **TOL[dtype])


@pytest.mark.parametrize("pattern", ["zipf", "with_base", "distinct"])
def test_reference_matches_dense_oracle(pattern):
    in_f, out_f = 48, 40
    seg_starts, seg_slots, token_slot, tokens = make_batch(pattern, seed=7, sort=False)
    a, b, ranks = make_weights(in_f, out_f, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, in_f, generator=g).to(DEVICE)
    y = torch.randn(tokens, out_f, generator=g).to(DEVICE)
    expected = dense_oracle(x, a, b, y, token_slot)
    h = lora_shrink_ref(x, a, seg_starts, seg_slots, ranks)
    lora_expand_ref(h, b, y, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # and the kernels, end to end
    y2 = torch.randn(tokens, out_f, generator=g).to(DEVICE)
    expected2 = dense_oracle(x, a, b, y2, token_slot)
    lora_expand(lora_shrink(x, a, seg_starts, seg_slots, ranks), b, y2, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(y2.double(), expected2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    in_f, out_f = 64, 32
    seg_starts, seg_slots, _, tokens = make_batch("uniform", seed=11, sort=True)
    a, b, ranks = make_weights(in_f, out_f, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, in_f, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, out_f, generator=g).to(DEVICE, dtype)
    y_ref = y.clone()
    h = lora_shrink(x, a, seg_starts, seg_slots, ranks)
    h_ref = lora_shrink_ref(x, a, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(h, h_ref, atol=1e-2, rtol=1e-2)
    lora_expand(h, b, y, seg_starts, seg_slots, ranks)
    lora_expand_ref(h_ref, b, y_ref, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(y.float(), y_ref.float(), **TOL[torch.bfloat16])  # a few bf16 ulps


def test_empty_and_max_seg_len_hint():
    a, _, ranks = make_weights(16, 16, torch.float32, seed=0)
    x = torch.zeros(0, 16, device=DEVICE)
    empty = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    h = lora_shrink(x, a, empty, empty[:0], ranks)
    assert h.shape == (0, MAX_RANK)
    seg_starts, seg_slots, _, tokens = make_batch("zipf", seed=3, sort=True)
    x = torch.randn(tokens, 16, device=DEVICE)
    longest = int((seg_starts[1:] - seg_starts[:-1]).max())
    torch.testing.assert_close(lora_shrink(x, a, seg_starts, seg_slots, ranks, max_seg_len=longest),
                               lora_shrink_ref(x, a, seg_starts, seg_slots, ranks))


# ---- the engine's LoRA layer on the Triton path (what CUDA runs) against its torch path ----------------


@pytest.mark.parametrize("pattern", ["zipf", "with_base", "distinct", "identical"])
def test_lora_layer_triton_path_matches_torch_path(pattern):
    """LoRAWeights.apply on every path against a dense per-token oracle, every fused projection: the
    batched torch path (each slot's tokens one run: `identical`; scattered: the rest), the C++
    kernel where it builds, and the Triton SGMV path."""
    from transformers import LlamaConfig

    from batchgen.lora.adapters import LoRAAdapter, ProjectionDims
    from batchgen.lora.layers import FUSED, LoRAWeights
    from batchgen.models.llama import LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(config)
    dims = ProjectionDims.of_model(model)
    g = torch.Generator().manual_seed(0)
    specs = {"x": (4, ["q_proj", "v_proj", "down_proj"]), "y": (8, list(dims.dims)), "z": (2, ["o_proj", "up_proj"])}
    adapters = {}
    for name, (r, targets) in specs.items():
        weights = {}
        for layer in range(dims.num_layers):
            for t in targets:
                if name == "y" and layer == 1 and t == "k_proj":
                    continue  # a module left out in one layer
                in_f, out_f = dims.dims[t]
                weights[(layer, t)] = (torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), 0.5)
        adapters[name] = LoRAAdapter(name, "-", r, set(targets), weights)

    rng = random.Random(1)
    rows = 9
    lens = [1] * 4 + [rng.choice([3, 17, 33]) for _ in range(rows - 4)]
    row_slots = [s if s < 3 else -1 for s in pattern_slots(pattern, rows, rng)]
    tokens = sum(lens)
    out = {}
    for path in ("torch", "kernel", "triton"):
        use_triton = path == "triton"
        w = LoRAWeights(model, adapters, 3, torch.float32, torch.device("cpu"), use_triton=use_triton)
        if (path == "kernel" and not w.use_cpu_kernel) or (path == "triton" and not INTERPRETED):
            continue  # no C++ compiler here / Triton compiled for CUDA while these tensors are on CPU
        w.use_cpu_kernel = path == "kernel"
        w.load_pending([(0, "x"), (1, "y"), (2, "z")])
        w.set_batch(lens, row_slots)
        gen = torch.Generator().manual_seed(2)
        for layer in range(dims.num_layers):
            for proj, targets in FUSED.items():
                in_f = dims.dims[targets[0]][0]
                out_f = sum(dims.dims[t][1] for t in targets)
                x = torch.randn(tokens, in_f, generator=gen)
                y = torch.randn(tokens, out_f, generator=gen)
                out[(path, layer, proj)] = (x, y.clone(), w.apply(layer, proj, x, y))
    token_slot = [s for n, s in zip(lens, row_slots) for _ in range(n)]
    names = ["x", "y", "z"]
    for (path, layer, proj), (x, y0, y) in out.items():
        expected = y0.double().clone()  # dense oracle: every target into its slice of the fused output
        offset = 0
        for t in FUSED[proj]:
            out_f = dims.dims[t][1]
            for i, s in enumerate(token_slot):
                mod = adapters[names[s]].weights.get((layer, t)) if s >= 0 else None
                if mod is not None:
                    a, b, scale = mod
                    expected[i, offset:offset + out_f] += scale * (x[i].double() @ a.double().T) @ b.double().T
            offset += out_f
        where = f"{path} path, layer {layer} {proj}"
        torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
