"""Multi-LoRA delta on CPU, in C++ (compiled on first use): one call per fused projection.

Semantics, per token t whose slot s = token_slots[t] is >= 0 (tokens with -1 are left alone):
    h = a[s] @ x[t]                                  a [slots, R_f, in]: the targets' A stacked
    for target k, with B_k = bs[k] [slots, R, out_k] and rank columns k*R .. (k+1)*R:
        y[t, offsets[k]:offsets[k] + out_k] += h[k*R:(k+1)*R] @ B_k[s]
Shapes: x [tokens, in]; y [tokens, out of the fused projection], updated in place; token_slots
[tokens] int64. Accumulation in fp32; y rounds once to its dtype.

Why a kernel: at decode the LoRA FLOPs are ~4% of the base model's, but as torch ops they are
dozens of tiny gathers, bmms and index_adds per layer whose fixed costs exceed the math. Here each
job is up to 16 tokens of one slot: it widens that slot's B (and A, unless the shrink runs as
AVX512-BF16 dot products straight from bf16) to fp32 once, then streams each A row and B slice over
all of the job's tokens.
`lora_delta_ref` beside it is the torch reference.
"""

from __future__ import annotations

import torch

from ._cpu_build import lazy_build

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

// Dot products of 4 (or 1) A rows with one token's x, straight from bf16 with AVX512-BF16 dot
// instructions (no widening pass). Elsewhere (other dtypes, other CPUs) the job widens A to fp32.
template <typename T> static inline bool native_shrink(int64_t in) { return false; }
template <typename T> static inline void dot4_native(const T*, int64_t, const T*, float*) {}
template <typename T> static inline float dot1_native(const T*, const T*, int64_t) { return 0.f; }
#if defined(__AVX512BF16__)
template <> inline bool native_shrink<at::BFloat16>(int64_t in) { return in % 32 == 0; }
template <> inline void dot4_native<at::BFloat16>(const at::BFloat16* r, int64_t in, const at::BFloat16* x,
                                                  float* out) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
    s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(r + i), xv);
    s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(r + in + i), xv);
    s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(r + 2 * in + i), xv);
    s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(r + 3 * in + i), xv);
  }
  out[0] = _mm512_reduce_add_ps(s0), out[1] = _mm512_reduce_add_ps(s1);
  out[2] = _mm512_reduce_add_ps(s2), out[3] = _mm512_reduce_add_ps(s3);
}
template <> inline float dot1_native<at::BFloat16>(const at::BFloat16* r, const at::BFloat16* x, int64_t in) {
  __m512 s0 = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32)
    s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(r + i), (__m512bh)_mm512_loadu_si512(x + i));
  return _mm512_reduce_add_ps(s0);
}
#endif

template <typename T>
static void lora_impl(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& a,
                      const std::vector<torch::Tensor>& bs, const std::vector<int64_t>& offsets,
                      const int64_t* slots, int64_t rank) {
  const int64_t tokens = x.size(0), in = x.size(1), rf = a.size(1), num_slots = a.size(0);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const int64_t sx = x.stride(0), sy = y.stride(0);
  // Jobs: up to kTokens tokens of one slot. A job widens its slot's B (and A, without native bf16
  // dot products) to fp32 once and reuses them for each of its tokens.
  const bool native = native_shrink<T>(in);
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
    // Per-thread scratch kept across calls: a fresh 100+ KiB allocation is fresh pages every call.
    thread_local std::vector<float> af, bf, xf, h;
    af.resize(native ? 0 : rf * in), bf.resize(b_size), xf.resize(native ? 0 : kTokens * in), h.resize(kTokens * rf);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t s = jobs[job].first;
      const int64_t* toks = by_slot[s].data() + jobs[job].second;
      const int64_t ntok = std::min(kTokens, (int64_t)by_slot[s].size() - jobs[job].second);
      const T* as = ap + s * rf * in;
      if (!native) {
        load_row(as, af.data(), rf * in);
        for (int64_t n = 0; n < ntok; ++n) load_row(xp + toks[n] * sx, xf.data() + n * in, in);
      }
      for (size_t k = 0, at = 0; k < bs.size(); at += rank * bs[k].size(2), ++k)
        load_row(bs[k].data_ptr<T>() + s * rank * bs[k].size(2), bf.data() + at, rank * bs[k].size(2));
      // Shrink, h[n, j] = A[j, :] . x_n: four A rows at a time against every token of the job, so
      // those rows are read from cache once per job, not once per token.
      for (int64_t j = 0; j < rf; j += 4) {
        const int64_t rows = std::min<int64_t>(4, rf - j);
        for (int64_t n = 0; n < ntok; ++n) {
          float* hn = h.data() + n * rf + j;
          if (native && rows == 4) {
            dot4_native(as + j * in, in, xp + toks[n] * sx, hn);
          } else if (native) {
            for (int64_t u = 0; u < rows; ++u) hn[u] = dot1_native(as + (j + u) * in, xp + toks[n] * sx, in);
          } else if (rows == 4) {
            const float* r = af.data() + j * in;
            const float* x = xf.data() + n * in;
            dot4(r, r + in, r + 2 * in, r + 3 * in, x, x, x, x, in, hn);
          } else {
            for (int64_t u = 0; u < rows; ++u) hn[u] = dot(af.data() + (j + u) * in, xf.data() + n * in, in);
          }
        }
      }
      // Expand, target by target, kOut outputs at a time against every token of the job (that slice
      // of B stays in cache), accumulated in registers over the rank.
      const float* bk = bf.data();
      for (size_t k = 0; k < bs.size(); bk += rank * bs[k].size(2), ++k) {
        const int64_t out = bs[k].size(2);
        for (int64_t o0 = 0; o0 < out; o0 += kOut) {
          const int64_t width = std::min(kOut, out - o0);
          for (int64_t n = 0; n < ntok; ++n) {
            const float* hk = h.data() + n * rf + k * rank;
            float acc[kOut] = {0.f}, row[kOut];
            for (int64_t r = 0; r < rank; ++r) {
              if (hk[r] == 0.f) continue;  // ranks past the adapter's own are zero in A
              const float* br = bk + r * out + o0;
              for (int64_t o = 0; o < width; ++o) acc[o] += hk[r] * br[o];
            }
            T* yt = yp + toks[n] * sy + offsets[k] + o0;
            load_row(yt, row, width);
            for (int64_t o = 0; o < width; ++o) row[o] += acc[o];
            store_row(row, yt, width);
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

load = lazy_build("batchgen_cpu_lora", _SOURCE, ["lora_delta_"])


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
