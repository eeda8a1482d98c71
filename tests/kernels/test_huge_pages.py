"""kernels/huge_pages.py: what it hands out equals what torch would, and its memory is advised for
huge pages where Linux offers them."""

from __future__ import annotations

import pathlib

import pytest
import torch

from batchgen.kernels import cpu_amx_linear, huge_pages


def _thp_mode() -> str | None:
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1:text.index("]")]


def _advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping that holds t's first byte is advised for huge pages (its VmFlags in
    /proc/self/smaps carry "hg"): what the allocator asks for; whether the kernel then finds free
    2 MiB pages depends on the machine's fragmentation."""
    addr, inside = t.data_ptr(), False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


def test_contiguous_copies_exactly_and_aligned():
    w = torch.randn(96, 70).to(torch.bfloat16)
    views = [w.t(), w[:, 3:50], w.view(48, 2, 70).permute(1, 0, 2)]
    copies = [huge_pages.contiguous(v) for v in views]
    for v, c in zip(views, copies):
        assert c.is_contiguous() and c.shape == v.shape and c.dtype == v.dtype
        assert torch.equal(c, v)
        assert c.data_ptr() % huge_pages.ALIGN == 0
    # carved from one chunk, none overlapping another
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size()) for c in copies)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_zeros_and_empty_shapes():
    z = huge_pages.zeros((2, 5, 16, 3, 8), torch.float32)
    assert z.shape == (2, 5, 16, 3, 8) and z.is_contiguous() and not z.any()
    assert huge_pages.zeros((0, 4), torch.bfloat16).shape == (0, 4)
    assert huge_pages.contiguous(torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="this kernel offers no transparent huge pages")
def test_the_weights_and_kv_pool_are_advised_for_huge_pages():
    kv = huge_pages.zeros((2, 512, 16, 4, 64), torch.bfloat16)  # 16 MiB: a small KV pool
    assert _advised_huge(kv)
    assert not _advised_huge(torch.zeros(2, 512, 16, 4, 64, dtype=torch.bfloat16))  # the check can fail
    if cpu_amx_linear.available():  # a packed weight, from the shared chunks
        assert _advised_huge(cpu_amx_linear.pack(torch.randn(3072, 576)))
