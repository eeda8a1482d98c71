"""Micro-benchmark of batchgen's CPU linear kernels against oneDNN's packed GEMM, on the embedded
model's projections at decode and prefill row counts: on CPUs with AMX tiles the bf16 AMX kernel
(kernels/cpu_amx_linear.py), on AVX2 CPUs without AVX-512 the fp32 AVX2 kernel
(kernels/cpu_avx2_linear.py), each in its own dtype.

Each projection rotates over enough copies of its weight (~300 MB) that the weights come from DRAM,
as in an engine step. gate_up is timed as the MLP runs it: oneDNN's projection then the C++
SiLU-and-mul, against the AMX kernel with the activation in its epilogue (the AVX2 kernel: its
projection, then the same SiLU-and-mul). The `step` line sums a
decode step's linears: 30 layers of q/k/v, o, gate_up (+ SiLU) and down, plus the tied LM head.

    python -m benchmarks.linear_micro [ROWS,...]   (default 1,16,64,128,256)
"""

from __future__ import annotations

import sys
import time

import torch

from batchgen.kernels import cpu_amx_linear, cpu_avx2_linear, cpu_ops
from batchgen.models.packed_linear import pack_weight, packed_linear

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


def ours(name: str, n: int):
    """(label, dtype, pack, call) of batchgen's kernel for this CPU and projection, or None."""
    if cpu_amx_linear.available():
        if name == "gate_up":
            return ("AMX", torch.bfloat16, cpu_amx_linear.pack_gate_up,
                    lambda a, w: cpu_amx_linear.gate_up(a, w, None, n // 2, silu_mul=True))
        return "AMX", torch.bfloat16, cpu_amx_linear.pack, lambda a, w: cpu_amx_linear.linear(a, w, None, n)
    if cpu_avx2_linear.available():
        def project(a, w):
            y = cpu_avx2_linear.linear(a, w, None, n)
            return cpu_ops.silu_mul(y) if name == "gate_up" else y

        return "AVX2", torch.float32, cpu_avx2_linear.pack, project
    return None


def main(rows_list: list[int]) -> None:
    if ours("o", 576) is None:
        print("this CPU (or build) takes neither the AMX nor the AVX2 kernel: nothing to compare")
        return
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; us per call, weight read rate (GB/s)")
    for rows in rows_list:
        step = {"onednn": 0.0, "ours": 0.0}
        for name, (n, k) in SHAPES.items():
            label, dtype, pack, call = ours(name, n)
            size = torch.finfo(dtype).bits // 8
            dense = [torch.randn(n, k, dtype=dtype) * 0.02 for _ in range(max(2, int(DRAM_BYTES // (n * k * size))))]
            x = torch.randn(rows, k, dtype=dtype)
            onednn_call = (lambda a, w: cpu_ops.silu_mul(packed_linear(a, w))) if name == "gate_up" else packed_linear
            onednn = seconds_per_call(onednn_call, [pack_weight(w) for w in dense], x)
            kernel = seconds_per_call(call, [pack(w) for w in dense], x)
            per_step = 1 if name == "lm_head" else LAYERS
            step["onednn"] += onednn * per_step
            step["ours"] += kernel * per_step
            print(f"rows {rows:4d} {name:8s} oneDNN {onednn * 1e6:8.1f} us {n * k * size / onednn / 1e9:5.1f} GB/s | "
                  f"{label} {kernel * 1e6:8.1f} us {n * k * size / kernel / 1e9:5.1f} GB/s | {onednn / kernel:.2f}x")
        print(f"rows {rows:4d} step linears: oneDNN {step['onednn'] * 1e3:.1f} ms, {label} {step['ours'] * 1e3:.1f} ms "
              f"({step['onednn'] / step['ours']:.2f}x)")


if __name__ == "__main__":
    main([int(r) for r in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 16, 64, 128, 256])
