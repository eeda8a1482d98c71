"""Small helpers shared by the kernels (no batchgen imports)."""

from __future__ import annotations

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreted(fn) -> bool:
    """True when the @triton.jit function `fn` was built for the interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(fn, InterpretedFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 (no TF32), native for 16-bit types."""
    return "ieee" if dtype == torch.float32 else "tf32"

