"""Micro-benchmark of the C++ CPU decode-attention kernel: the current one against an older
commit's, in one process, alternating, on a decode step's shapes (the embedded model's 9 query /
3 KV heads, head_dim 64, blocks of 16, bf16).

Two layouts: `plain` (every row its own context, as W1's decode) and `shared` (the rows over 4
shared prefixes of 24 blocks plus 50 tokens each, as W3's, through the shared-prefix kernel).
`cold` rotates over 30 disjoint sets of blocks, one per layer, so K/V come from DRAM as in an engine
step; `warm` repeats one set, which then sits in the cache. On AMX CPUs a third table times the
causal prefill chunk kernel (`chunk_attention`) on 4 chunks of 512 tokens.

    python -m benchmarks.decode_attention_micro [REV]   (REV: the older commit, 799853c by default)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from batchgen.kernels import cpu_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
LAYERS = 30
PREFIXES, PREFIX_BLOCKS, SUFFIX = 4, 24, 50  # the shared layout: 4 prefixes of 384 tokens, 50 own tokens


def old_kernel(rev: str):
    """The older commit's compiled kernel module (built under its own extension name)."""
    code = subprocess.run(["git", "show", f"{rev}:kernels/cpu_decode_attention.py"], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent).stdout
    code = code.replace('lazy_build("batchgen_cpu_decode_attention_', 'lazy_build("batchgen_old_decode_attention_')
    code = code.replace("from kernels.", "from batchgen.kernels.")  # the package's import name before the rename
    module = types.ModuleType("old_cpu_decode_attention")
    module.__package__ = "batchgen.kernels"  # its relative imports
    exec(compile(code, "old_cpu_decode_attention.py", "exec"), module.__dict__)
    return module.load()


def layouts(rows: int, ctx: int, gen: torch.Generator):
    """{name: (tables per layer, ctx_lens, groups or None)} over one K/V pool."""
    blocks_per_row = -(-ctx // BLOCK)
    plain_sets = torch.randperm(LAYERS * rows * blocks_per_row, generator=gen).view(LAYERS, rows, blocks_per_row)
    suffix_blocks = -(-SUFFIX // BLOCK)
    per_layer = PREFIXES * PREFIX_BLOCKS + rows * suffix_blocks
    ids = torch.randperm(LAYERS * per_layer, generator=gen).view(LAYERS, per_layer)
    shared_sets = []
    for layer in range(LAYERS):
        prefixes = ids[layer, :PREFIXES * PREFIX_BLOCKS].view(PREFIXES, PREFIX_BLOCKS)
        own = ids[layer, PREFIXES * PREFIX_BLOCKS:].view(rows, suffix_blocks)
        shared_sets.append(torch.cat([prefixes[torch.arange(rows) % PREFIXES], own], 1))
    order = torch.argsort(torch.arange(rows) % PREFIXES, stable=True)
    groups = (order, torch.arange(0, rows + 1, rows // PREFIXES), torch.full((PREFIXES,), PREFIX_BLOCKS))
    pool = max(LAYERS * rows * blocks_per_row, LAYERS * per_layer)
    return pool, {"plain": (list(plain_sets), torch.full((rows,), ctx), None),
                  "shared": (shared_sets, torch.full((rows,), PREFIX_BLOCKS * BLOCK + SUFFIX), groups)}


def call(module, q, k, v, tables, lens, groups):
    if groups is None:
        return module.decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, 0)
    return module.cascade_decode_attention(q, k, v, tables, lens, HEAD_DIM ** -0.5, *groups)


def alternate(kernels: dict, run, repeats: int) -> tuple[float, float]:
    """Median us of run(module) for the old and the new kernel, taken in turn (the first round warms up)."""
    times = {"old": [], "new": []}
    for _ in range(repeats + 1):
        for who, module in kernels.items():
            t = time.perf_counter()
            run(module)
            times[who].append(time.perf_counter() - t)
    return 1e6 * statistics.median(times["old"][1:]), 1e6 * statistics.median(times["new"][1:])


def main(rev: str = "799853c", rows: int = 64, ctx: int = 195, repeats: int = 5):
    gen = torch.Generator().manual_seed(0)
    pool, cases = layouts(rows, ctx, gen)
    k = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    q = torch.randn(rows, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    kernels = {"old": old_kernel(rev), "new": cpu_decode_attention.load()}
    print(f"{rows} rows, bf16, {torch.get_num_threads()} threads; us per layer call, median of {repeats} "
          f"sweeps over {LAYERS} layers (old = {rev})")
    print("| layout | K/V | old us | new us | old / new | new GB/s of K/V read |")
    print("|---|---|---|---|---|---|")
    for name, (sets, lens, groups) in cases.items():
        ref = call(kernels["old"], q, k, v, sets[0], lens, groups).float()
        assert (call(kernels["new"], q, k, v, sets[0], lens, groups).float() - ref).abs().max() < 2e-2
        for temp, used in (("cold", sets), ("warm", sets[:1] * LAYERS)):
            def sweep(module, used=used, lens=lens, groups=groups):
                for tables in used:
                    call(module, q, k, v, tables, lens, groups)

            old, new = (t / LAYERS for t in alternate(kernels, sweep, repeats))
            unique_tokens = PREFIXES * PREFIX_BLOCKS * BLOCK + rows * SUFFIX if groups is not None else rows * ctx
            gbs = unique_tokens * KV_HEADS * HEAD_DIM * 2 * 2 / (new * 1e-6) / 1e9
            print(f"| {name} | {temp} | {old:.0f} | {new:.0f} | {old / new:.2f}x | {gbs:.1f} |")
    if cpu_decode_attention.amx_available() and hasattr(kernels["old"], "chunk_attention"):
        chunks(kernels, gen, repeats)


def chunks(kernels: dict, gen: torch.Generator, repeats: int, num: int = 4, length: int = 512):
    """Prefill: `num` causal chunks of `length` tokens from position 0 (W2's prompts), through the
    AMX chunk kernel (chunk_attention), one layer's K/V (in cache after the first call)."""
    blocks = length // BLOCK
    k = torch.randn(num * blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(num * blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num * blocks, generator=gen).view(num, blocks)
    q = torch.randn(num * length, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    starts, lens, positions = torch.arange(num) * length, torch.full((num,), length), torch.zeros(num, dtype=torch.long)

    def run(module):
        out = torch.empty_like(q)
        module.chunk_attention(q, k, v, tables, starts, lens, positions, HEAD_DIM ** -0.5, out)
        return out

    assert (run(kernels["old"]).float() - run(kernels["new"]).float()).abs().max() < 2e-2
    old, new = alternate(kernels, run, repeats)
    flops = 4 * HEAD_DIM * HEADS * num * length * (length + 1) / 2  # QK^T and P @ V over the causal triangle
    print(f"\n| prefill chunks ({num} x {length} tokens, AMX) | old us | new us | old / new | new GFLOP/s |")
    print("|---|---|---|---|---|")
    print(f"| one layer | {old:.0f} | {new:.0f} | {old / new:.2f}x | {flops / (new * 1e-6) / 1e9:.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:2])
