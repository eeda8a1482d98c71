"""Compile every kernel for an NVIDIA GPU without one: Triton's bundled ptxas builds real cubins,
so a kernel that would not compile on the GPU fails here, on a CPU machine.

The real launchers run on CPU tensors with the kernels swapped for recorders; each recorded launch
(argument types and constexprs exactly as the launcher passes them) is then compiled for the target.
Run in a process without TRITON_INTERPRET=1:  python tests/kernels/gpu_compile_check.py [capability]
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import batchgen.kernels.lora_shrink_expand as lo
import batchgen.kernels.paged_attention as pa
import batchgen.kernels.rms_norm as rn
import batchgen.kernels.rotary as ro
import batchgen.kernels.store_kv as sk

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages")
launches: list[tuple] = []


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))


def arg_type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected launch argument {v!r}")


def record() -> None:
    for mod, name in [(pa, "_prefill_kernel"), (pa, "_decode_kernel"), (pa, "_merge_splits_kernel"),
                      (sk, "_store_kv_kernel"), (rn, "_rms_norm_kernel"), (ro, "_rotary_kernel"),
                      (lo, "_lora_shrink_kernel"), (lo, "_lora_expand_kernel")]:
        setattr(mod, name, Recorder(getattr(mod, name)))
    i32 = torch.int32
    for dtype, heads, kv_heads, head_dim, partition in [(torch.bfloat16, 32, 8, 128, 64),  # split-K
                                                        (torch.float32, 9, 3, 64, None)]:
        cache = torch.zeros(2, 8, 16, kv_heads, head_dim, dtype=dtype)
        q = torch.zeros(6, heads, head_dim, dtype=dtype)
        cu, ctx = torch.tensor([0, 1, 6], dtype=i32), torch.tensor([300, 5], dtype=i32)
        tables = torch.zeros(2, 19, dtype=i32)
        pa.paged_attention(q, cache, cu, ctx, tables, 0.1, partition_size=partition)
        k = torch.zeros(6, kv_heads, head_dim, dtype=dtype)
        sk.store_kv(k, k, cache, torch.zeros(6, dtype=torch.int64))
        ro.rotary_embedding(q, k, torch.zeros(64, head_dim, dtype=dtype), torch.zeros(64, head_dim, dtype=dtype),
                            torch.zeros(6, dtype=torch.int64))
        x = torch.zeros(6, 4096 if dtype == torch.bfloat16 else 576, dtype=dtype)
        rn.rms_norm(x, x[0], 1e-6, x)
        seg_starts, seg_slots, ranks = (torch.tensor(v, dtype=i32) for v in ([0, 2, 6], [0, -1], [8, 4]))
        h = lo.lora_shrink(x, torch.zeros(2, 16, x.shape[1], dtype=dtype), seg_starts, seg_slots, ranks)
        lo.lora_expand(h, torch.zeros(2, 96, 16, dtype=dtype), torch.zeros(6, 96, dtype=dtype), seg_starts, seg_slots,
                       ranks)


def compile_all(capability: int) -> list[str]:
    done, failures = set(), []
    for fn, args, kwargs in launches:
        params = [p for p in fn.params if not p.is_constexpr]
        sig = {p.name: arg_type(a) for p, a in zip(params, args)}
        consts = {k: v for k, v in kwargs.items() if k not in OPTIONS}
        sig.update({k: "constexpr" for k in consts})
        options = {k: v for k, v in kwargs.items() if k in OPTIONS}
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(options.items()))
        if key in done:
            continue
        done.add(key)
        label = f"{fn.__name__}({', '.join(f'{k}={v}' for k, v in consts.items())})"
        try:
            triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", capability, 32),
                           options=options)
            print("ok", label)
        except Exception as e:  # noqa: BLE001 - report every failing kernel
            failures.append(f"{label}: {type(e).__name__}: {e}")
    return failures


if __name__ == "__main__":
    record()
    failed = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    for f in failed:
        print("FAILED", f)
    sys.exit(1 if failed else 0)
