"""W7: one mixture-of-experts MLP layer against a dense MLP with the same active parameters, on the
machine's CPU (or GPU), in the same process and run.

At the embedded model's hidden size (576): 8 experts of intermediate size 768, top-2, random weights
(router included), against a dense SiLU MLP of intermediate size 2 * 768 = 1536 (SmolLM2's own MLP).
Each token runs two experts' GEMMs, so both layers do the same FLOPs; the MoE layer adds the router,
the sort by expert, the gather / scatter of rows and smaller GEMMs. Reported: median milliseconds per
call at a decode batch (64 tokens) and a prefill chunk (512 tokens), and MoE / dense (target <= 1.5x).

The floor of each layer, from the machine's limits measured in the same run (the best GEMM rate of
fp32 and the run's dtype, as the CPU MoE kernel computes in fp32; read bandwidth of a 256 MB tensor):
max(FLOPs / peak, weight bytes / bandwidth). Both layers do the same FLOPs, but at 64 tokens the MoE
layer reads every expert the router picked (all 8: 4x the dense layer's weight bytes).

    python -m benchmarks.moe_layer [--quick] [--dtype bfloat16]

On a shared, oversubscribed machine run it with OMP_NUM_THREADS=1: with two threads every parallel
region waits for a descheduled peer now and then, and the MoE layer (about ten times as many ops as
the dense one) pays that wait ten times as often, which swamps the comparison.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch import nn

HIDDEN, EXPERTS, TOP_K, EXPERT_INTER = 576, 8, 2, 768


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of a sum over a 256 MB fp32 tensor (best of `repeats`)."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best


def _time_pair(a, b, x, repeats: int) -> tuple[float, float]:
    """Median ms per call of a(x) and b(x), timed alternately so that both see the same machine load."""
    for _ in range(3):
        a(x), b(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


@torch.inference_mode()
def run(quick: bool = False, dtype: str = "bfloat16") -> dict:
    from types import SimpleNamespace

    from batchgen.models.llama import MLP
    from batchgen.models.moe import SparseMoE, route
    from batchgen.models.packed_linear import can_pack, pack_linears
    from benchmarks.roofline import gemm_peak_flops

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    moe = SparseMoE(HIDDEN, EXPERT_INTER, EXPERTS, TOP_K, renormalize=True)
    dense = MLP(SimpleNamespace(hidden_size=HIDDEN, intermediate_size=TOP_K * EXPERT_INTER, mlp_bias=False))
    for layer in (moe, dense):
        for p in layer.parameters():
            nn.init.normal_(p, 0, 0.02)
    moe, dense = moe.to(device, torch_dtype).eval(), dense.to(device, torch_dtype).eval()
    router = moe.gate.weight.detach().clone()
    packed = can_pack(device, torch_dtype)
    if packed:  # as the engine does for bf16 on CPU
        pack_linears(moe)
        pack_linears(dense)
        moe.pack_for_cpu()
    result = dict(peer="moe-layer", workload="W7", device=str(device), dtype=dtype, packed=packed,
                  threads=torch.get_num_threads(), config=f"hidden {HIDDEN}, {EXPERTS} experts x {EXPERT_INTER}, "
                  f"top-{TOP_K} vs dense {TOP_K * EXPERT_INTER}", shapes={})
    peak = gemm_peak_flops(torch.float32, device, repeats=3 if quick else 10)
    if torch_dtype != torch.float32:  # smaller: without bf16 instructions one 2048^3 bf16 GEMM takes seconds
        peak = max(peak, gemm_peak_flops(torch_dtype, device, n=1024, repeats=3))
    bandwidth = read_bandwidth() if device.type == "cpu" else float("nan")
    result.update(peak_gflops=peak / 1e9, read_gbps=bandwidth / 1e9)
    size = torch.empty(0, dtype=torch_dtype).element_size()
    expert_bytes = 3 * HIDDEN * EXPERT_INTER * size
    for tokens in (64, 512):
        x = torch.randn(tokens, HIDDEN, dtype=torch_dtype, device=device)
        repeats = 5 if quick else 30
        t_moe, t_dense = _time_pair(moe, dense, x, repeats)
        flops = 2 * tokens * TOP_K * 3 * HIDDEN * EXPERT_INTER  # both layers
        touched = int(route(x.float() @ router.float().T, TOP_K, True)[1].unique().numel())
        floor_moe = max(flops / peak, (touched * expert_bytes + router.numel() * size) / bandwidth) * 1e3
        floor_dense = max(flops / peak, TOP_K * expert_bytes / bandwidth) * 1e3
        result["shapes"][tokens] = dict(moe_ms=t_moe, dense_ms=t_dense, ratio=t_moe / t_dense, experts=touched,
                                        moe_floor_ms=floor_moe, dense_floor_ms=floor_dense)
    return result


def report_lines(r: dict) -> list[str]:
    lines = [f"W7 MoE layer ({r['config']}; {r['device']}, {r['dtype']}{', packed' if r['packed'] else ''}, "
             f"{r['threads']} threads): target MoE / dense <= 1.5x; floors from {r['peak_gflops']:.1f} GFLOP/s "
             f"and {r['read_gbps']:.1f} GB/s measured", "",
             "| tokens | MoE ms | dense ms | MoE / dense | MoE floor ms | dense floor ms | MoE / its floor | "
             "dense / its floor |", "|---|---|---|---|---|---|---|---|"]
    for tokens, s in r["shapes"].items():
        lines.append(f"| {tokens} | {s['moe_ms']:.3f} | {s['dense_ms']:.3f} | {s['ratio']:.2f}x | "
                     f"{s['moe_floor_ms']:.3f} | {s['dense_floor_ms']:.3f} | {s['moe_ms'] / s['moe_floor_ms']:.2f}x | "
                     f"{s['dense_ms'] / s['dense_floor_ms']:.2f}x |")
    return lines


if __name__ == "__main__":
    args = sys.argv[1:]
    r = run(quick="--quick" in args, dtype=args[args.index("--dtype") + 1] if "--dtype" in args else "bfloat16")
    print("\n".join(report_lines(r)))
    print(json.dumps(r))
