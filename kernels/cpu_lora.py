"""Multi-LoRA delta on CPU, in C++ (compiled on first use): one call per fused projection.

Semantics, per token t whose slot s = token_slots[t] is >= 0 (tokens with -1 are left alone):
    h = a[s] @ x[t]                                  a [slots, R_f, in]: the targets' A stacked
    for target k, with B_k = bs[k] [slots, R, out_k] and rank columns k*R .. (k+1)*R:
        y[t, offsets[k]:offsets[k] + out_k] += h[k*R:(k+1)*R] @ B_k[s]
Shapes: x [tokens, in]; y [tokens, out of the fused projection], updated in place; token_slots
[tokens] int64. Accumulation in fp32; y rounds once to its dtype.

Why a kernel: at decode the LoRA FLOPs are ~4% of the base model's, but as torch ops they are
dozens of tiny gathers, bmms and index_adds per layer whose fixed costs exceed the math. Here each
job is up to 16 tokens of one slot: it widens that slot's A and B to fp32 once, then each token is
one pass over them.
`lora_delta_ref` beside it is the torch reference.
"""

from __future__ import annotations

import torch

from kernels._cpu_build import ROW_CONVERSIONS, build

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <vector>

template <typename T>
static void lora_impl(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& a,
                      const std::vector<torch::Tensor>& bs, const std::vector<int64_t>& offsets,
                      const int64_t* slots, int64_t rank) {
  const int64_t tokens = x.size(0), in = x.size(1), rf = a.size(1), num_slots = a.size(0);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t sx = x.stride(0), sy = y.stride(0);
  // Jobs: up to kTokens tokens of one slot. A job widens its slot's A and B to fp32 once and
  // reuses them for each of its tokens.
  constexpr int64_t kTokens = 16, kOut = 64;
  std::vector<std::vector<int64_t>> by_slot(num_slots);
  for (int64_t t = 0; t < tokens; ++t)
    if (slots[t] >= 0) by_slot[slots[t]].push_back(t);
  std::vector<std::pair<int64_t, int64_t>> jobs;  // (slot, first index into by_slot[slot])
  for (int64_t s = 0; s < num_slots; ++s)
    for (int64_t i = 0; i < (int64_t)by_slot[s].size(); i += kTokens) jobs.emplace_back(s, i);
  int64_t b_size = 0;
  for (const auto& b : bs) b_size += rank * b.size(2);

  at::parallel_for(0, (int64_t)jobs.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> af(rf * in), bf(b_size), xf(in), h(rf);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = jobs[job].first;
      const auto& toks = by_slot[s];
      const int64_t first = jobs[job].second, last = std::min(first + kTokens, (int64_t)toks.size());
      load_row(ap + s * rf * in, af.data(), rf * in);
      for (size_t k = 0, at = 0; k < bs.size(); at += rank * bs[k].size(2), ++k)
        load_row(bs[k].data_ptr<T>() + s * rank * bs[k].size(2), bf.data() + at, rank * bs[k].size(2));
      for (int64_t n = first; n < last; ++n) {
        const int64_t t = toks[n];
        load_row(xp + t * sx, xf.data(), in);
        int64_t j = 0;  // shrink: h[j] = A[j, :] . x, four rows at a time
        for (; j + 4 <= rf; j += 4) {
          const float* r = af.data() + j * in;
          dot4(r, r + in, r + 2 * in, r + 3 * in, xf.data(), xf.data(), xf.data(), xf.data(), in, h.data() + j);
        }
        for (; j < rf; ++j) h[j] = dot(af.data() + j * in, xf.data(), in);
        const float* bk = bf.data();
        for (size_t k = 0; k < bs.size(); bk += rank * bs[k].size(2), ++k) {  // expand, target by target
          const int64_t out = bs[k].size(2);
          const float* hk = h.data() + k * rank;
          T* yt = yp + t * sy + offsets[k];
          for (int64_t o0 = 0; o0 < out; o0 += kOut) {  // kOut outputs at a time, accumulated in registers
            const int64_t width = std::min(kOut, out - o0);
            float acc[kOut] = {0.f}, row[kOut];
            for (int64_t r = 0; r < rank; ++r) {
              if (hk[r] == 0.f) continue;  // ranks past the adapter's own are zero in A
              const float* br = bk + r * out + o0;
              for (int64_t o = 0; o < width; ++o) acc[o] += hk[r] * br[o];
            }
            load_row(yt + o0, row, width);
            for (int64_t o = 0; o < width; ++o) row[o] += acc[o];
            store_row(row, yt + o0, width);
          }
        }
      }
    }
  });
}

void lora_delta_(torch::Tensor x, torch::Tensor y, torch::Tensor a, std::vector<torch::Tensor> bs,
                 std::vector<int64_t> offsets, torch::Tensor token_slots, int64_t rank) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1 && x.size(0) == y.size(0),
              "lora_delta_: x [tokens, in] and y [tokens, out] with contiguous rows");
  TORCH_CHECK(a.is_contiguous() && a.size(2) == x.size(1) && a.size(1) == rank * (int64_t)bs.size(),
              "lora_delta_: a must be [slots, rank * targets, in]");
  TORCH_CHECK(bs.size() == offsets.size(), "lora_delta_: one offset per target");
  for (size_t k = 0; k < bs.size(); ++k) {
    TORCH_CHECK(bs[k].is_contiguous() && bs[k].size(1) == rank && bs[k].scalar_type() == x.scalar_type() &&
                offsets[k] + bs[k].size(2) <= y.size(1), "lora_delta_: b must be [slots, rank, out] inside y");
  }
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type(), "lora_delta_: one dtype");
  auto slots = token_slots.to(torch::kInt64).contiguous();
  TORCH_CHECK(slots.numel() == x.size(0), "lora_delta_: one slot per token");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_delta_",
                                  [&] { lora_impl<scalar_t>(x, y, a, bs, offsets, slots.data_ptr<int64_t>(), rank); });
}
"""

_module = None
_tried = False


def load():
    """The compiled extension, or None when it cannot be built here (callers fall back to torch)."""
    global _module, _tried
    if not _tried:
        _tried = True
        _module = build("batchgen_cpu_lora", ROW_CONVERSIONS + _SOURCE, ["lora_delta_"])
    return _module


def lora_delta_(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], offsets: list[int],
                token_slots: torch.Tensor, rank: int) -> None:
    load().lora_delta_(x, y, a, bs, offsets, token_slots, rank)


def lora_delta_ref(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], offsets: list[int],
                   token_slots: torch.Tensor, rank: int) -> None:
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s < 0:
            continue
        h = a[s].float() @ x[t].float()  # [R_f]
        for k, (b, offset) in enumerate(zip(bs, offsets)):
            out = b.shape[-1]
            delta = h[k * rank:(k + 1) * rank] @ b[s].float()  # [out]
            y[t, offset:offset + out] = (y[t, offset:offset + out].float() + delta).to(y.dtype)
