"""Micro-benchmark of the bf16 CPU linears: the AMX kernel (kernels/cpu_amx_linear.py) against
oneDNN's packed GEMM, on the embedded model's projections at decode and prefill row counts.

Each projection rotates over enough copies of its weight (~300 MB) that the weights come from DRAM,
as in an engine step. gate_up is timed as the MLP runs it: oneDNN's projection then the C++
SiLU-and-mul, against the AMX kernel with the activation in its epilogue. The `step` line sums a
decode step's linears: 30 layers of q/k/v, o, gate_up (+ SiLU) and down, plus the tied LM head.

    python -m benchmarks.linear_micro [ROWS,...]   (default 1,16,64,128,256)
"""

from __future__ import annotations

import sys
import time

import torch

from batchgen.models.packed_linear import pack_weight, packed_linear
from kernels import cpu_amx_linear, cpu_ops

LAYERS = 30
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
DRAM_BYTES = 300e6  # weight copies rotated per projection: beyond the last-level cache


def seconds_per_call(fn, weights, x, reps: int = 3) -> float:
    for w in weights:
        fn(x, w)
    start = time.perf_counter()
    for _ in range(reps):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) / (reps * len(weights))


def main(rows_list: list[int]) -> None:
    if not cpu_amx_linear.available():
        print("this CPU (or build) has no AMX-BF16: nothing to compare")
        return
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; us per call, weight read rate (GB/s)")
    for rows in rows_list:
        step = {"onednn": 0.0, "amx": 0.0}
        for name, (n, k) in SHAPES.items():
            dense = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(max(2, int(DRAM_BYTES // (n * k * 2))))]
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            if name == "gate_up":
                onednn = seconds_per_call(lambda a, w: cpu_ops.silu_mul(packed_linear(a, w)),
                                          [pack_weight(w) for w in dense], x)
                amx = seconds_per_call(lambda a, w, n=n: cpu_amx_linear.gate_up(a, w, None, n // 2, silu_mul=True),
                                       [cpu_amx_linear.pack_gate_up(w) for w in dense], x)
            else:
                onednn = seconds_per_call(packed_linear, [pack_weight(w) for w in dense], x)
                amx = seconds_per_call(lambda a, w, n=n: cpu_amx_linear.linear(a, w, None, n),
                                       [cpu_amx_linear.pack(w) for w in dense], x)
            per_step = 1 if name == "lm_head" else LAYERS
            step["onednn"] += onednn * per_step
            step["amx"] += amx * per_step
            print(f"rows {rows:4d} {name:8s} oneDNN {onednn * 1e6:8.1f} us {n * k * 2 / onednn / 1e9:5.1f} GB/s | "
                  f"AMX {amx * 1e6:8.1f} us {n * k * 2 / amx / 1e9:5.1f} GB/s | {onednn / amx:.2f}x")
        print(f"rows {rows:4d} step linears: oneDNN {step['onednn'] * 1e3:.1f} ms, AMX {step['amx'] * 1e3:.1f} ms "
              f"({step['onednn'] / step['amx']:.2f}x)")


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16, 64, 128, 256])
