"""The machine's own limits, measured in the same run: GEMM peak and model FLOPs per token."""

from __future__ import annotations

import time

import torch


def gemm_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best of `repeats` n^3 GEMMs after a warm-up (a shared VM's speed drifts: best-of is the peak)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):  # warm-up: oneDNN's kernel choice, page faults, clocks
        a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_token(model: torch.nn.Module) -> float:
    """2 * matmul parameters (projections + LM head); attention's context term is left out."""
    params = sum(m.in_features * m.out_features for m in model.modules()
                 if hasattr(m, "in_features") and hasattr(m, "out_features"))  # nn.Linear and PackedLinear
    if getattr(model, "tie_word_embeddings", False):
        params += model.embed_tokens.weight.numel()  # the LM head reuses the embedding
    return 2.0 * params
