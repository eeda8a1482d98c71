"""CPU tensors on transparent huge pages (2 MiB), for the memory a decode step streams: the packed
weights and the KV cache.

Why: a decode step reads every weight once (~270 MB for the embedded model) and its rows' K/V
scattered over the pool. On 2 MiB pages the AMX linear kernel read one projection's weights at ~20
GB/s instead of ~16 (2-core AMX VM, 16 rows), and a decode step's linears took 13.0 ms instead of
16.7 at 16 rows, 18.9 instead of 26.9 at 64 (docs/PERFORMANCE.md). The likely reasons: a TLB miss
every 4 KiB on small pages, and hardware prefetchers that stop at page boundaries.

Linux backs an anonymous range with huge pages only where asked (transparent_hugepage "madvise",
the common default) and only for whole 2 MiB pages, so weights (a layer's q/k/v projection is ~1 MB)
are copied into shared 64 MiB chunks (`contiguous`: a bump allocator over chunks that are
`madvise(MADV_HUGEPAGE)`d before their first touch). Each tensor is a view of its chunk's storage
and keeps the chunk alive; the allocator holds only the chunk it is filling. A KV pool (`zeros`)
gets pages of its own, freed with it. Where huge pages are not offered (another OS, THP "never"),
the memory is plain and nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
CHUNK_BYTES = 64 << 20
ALIGN = 64  # a cache line: AMX tile loads and AVX-512 loads of a row never straddle two
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _huge_buffer(nbytes: int) -> tuple[torch.Tensor, int]:
    """(uint8 storage, offset of its first 2 MiB boundary), the whole pages from there advised."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -buf.data_ptr() % HUGE_PAGE
    madvise = _madvise()
    if madvise is not None:  # advice only: a refusal (old kernel, THP off) leaves plain pages
        madvise(buf.data_ptr() + offset, nbytes // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)
    return buf, offset


class _Arena:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunk: torch.Tensor | None = None  # [CHUNK_BYTES] uint8 view, 2 MiB aligned
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """nbytes of uint8, ALIGN-aligned, untouched (never handed out before)."""
        if nbytes > CHUNK_BYTES // 4:  # big enough for pages of its own
            buf, offset = _huge_buffer(nbytes)
            return buf[offset:offset + nbytes]
        with self.lock:
            start = math.ceil(self.used / ALIGN) * ALIGN
            if self.chunk is None or start + nbytes > CHUNK_BYTES:
                buf, offset = _huge_buffer(CHUNK_BYTES)
                self.chunk, start = buf[offset:offset + CHUNK_BYTES], 0
            self.used = start + nbytes
            return self.chunk[start:start + nbytes]


_arena = _Arena()


def _nbytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _as(raw: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return raw.view(dtype).view(tuple(shape))


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t on huge pages, from the shared chunks: for what is made once
    and kept (a packed weight)."""
    nbytes = _nbytes(t.shape, t.dtype)
    return _as(_arena.take(max(nbytes, 1))[:nbytes], t.shape, t.dtype).copy_(t)


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor on huge pages of its own, freed with it (a KV pool)."""
    nbytes = _nbytes(shape, dtype)
    buf, offset = _huge_buffer(max(nbytes, 1))
    return _as(buf[offset:offset + nbytes], shape, dtype).zero_()
