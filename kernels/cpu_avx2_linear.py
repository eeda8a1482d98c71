"""fp32 linear layers on AVX2/FMA registers (C++, compiled on first use), for CPUs without AVX-512.

Semantics: `linear(x, w, bias)` is `F.linear(x, weight, bias)` for fp32 x [rows, in] and weight
[out, in]: each output is one chain of fp32 fused multiply-adds over the inputs in order
(x[r, 0] * w[c, 0] first), plus the bias after the last one. It equals MKL's or oneDNN's result up
to fp32 summation order.

Why: on a 2-core Zen 3 EPYC (AVX2) oneDNN's packed fp32 GEMM ran a 64-row decode step's linears
(64 rows x 576 inputs on the embedded model) at about half the two cores' FMA peak, this kernel at
60-65% (1.14-1.33x; docs/PERFORMANCE.md); a register block of 6 rows x 16 output columns (12
accumulators, two weight loads and six broadcasts per input) runs at ~95% of peak from L1.
Each thread takes a contiguous range of 16-column weight panels, so it streams one contiguous range
of the packed weight; a panel is multiplied by every block of 6 rows in turn, the
later blocks reading it from cache. Rows go in blocks whose input slice stays in L2 (`row_block`),
packed by each thread so that one block's six rows are one stream; inputs in blocks of at most 2048
(a panel's slice stays in L2 too), the partial sums of a [rows, 16] block in a local buffer between
input blocks.

Layout (`pack`, once at load time; the dense weight is dropped): [out / 16, in, 16], element
[p, k, c] = weight[16 p + c, k]: one panel's 16 weights per input, 64 contiguous bytes.
Needs out % 16 == 0 (`supports`); other shapes, fp32 on AVX-512 CPUs and other dtypes keep oneDNN or
MKL (models/packed_linear.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import huge_pages
from ._cpu_build import cpu_flags, lazy_build

PANEL = 16  # output columns per weight panel: two 8-lane fp32 registers

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <memory>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

constexpr int64_t PANEL = 16;            // output columns per packed panel (two ymm registers)
constexpr int64_t MR = 6;                // rows per register block: 12 accumulators + 2 weights + 1 input
constexpr int64_t MAX_ROW_BLOCK = 144;          // rows whose packed input is kept in L2 while the panels go by
constexpr int64_t MAX_K_BLOCK = 2048;           // inputs per pass: a panel's slice (64 B per input) stays in L2
constexpr int64_t L2_INPUT_BYTES = 384 * 1024;  // of a 512 KB L2: the rest for the panel

#define BG_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

// c[R, 16] (+)= a[0:kc, R] @ panel[0:kc, 16]: `a` holds R input rows interleaved (the R values
// of one input contiguous: one stream to broadcast from), the panel's 16 weights for one input are
// contiguous. `accumulate` adds to c's previous contents (an earlier input block), else overwrites.
template <int R>
static void register_block(int64_t kc, const float* a, const float* panel, float* c, bool accumulate) {
#define BG_DECLARE(r) __m256 c##r##0 = _mm256_setzero_ps(), c##r##1 = _mm256_setzero_ps();
  BG_ROWS(BG_DECLARE)
#define BG_LOAD(r) if constexpr (R > r) { c##r##0 = _mm256_load_ps(c + 16 * r); c##r##1 = _mm256_load_ps(c + 16 * r + 8); }
  if (accumulate) { BG_ROWS(BG_LOAD) }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(panel + 16 * k), w1 = _mm256_load_ps(panel + 16 * k + 8);
#define BG_FMA(r) if constexpr (R > r) { const __m256 x = _mm256_broadcast_ss(a + R * k + r); \
    c##r##0 = _mm256_fmadd_ps(x, w0, c##r##0); c##r##1 = _mm256_fmadd_ps(x, w1, c##r##1); }
    BG_ROWS(BG_FMA)
  }
#define BG_STORE(r) if constexpr (R > r) { _mm256_store_ps(c + 16 * r, c##r##0); _mm256_store_ps(c + 16 * r + 8, c##r##1); }
  BG_ROWS(BG_STORE)
}

using BlockFn = void (*)(int64_t, const float*, const float*, float*, bool);
static const BlockFn BLOCKS[MR + 1] = {nullptr, register_block<1>, register_block<2>, register_block<3>,
                                       register_block<4>, register_block<5>, register_block<6>};

// Inputs per pass and rows per block for k inputs: k split into equal blocks of at most
// MAX_K_BLOCK; rows so that the input slice [rows, k] fits L2_INPUT_BYTES (whole register blocks).
static int64_t k_block(int64_t k) {
  const int64_t passes = (k + MAX_K_BLOCK - 1) / MAX_K_BLOCK;
  return (k + passes - 1) / passes;
}
static int64_t row_block(int64_t k) {
  const int64_t rows = L2_INPUT_BYTES / (4 * k) / MR * MR;
  return std::clamp<int64_t>(rows, MR, MAX_ROW_BLOCK);
}

// rows [0, rows) of x (row stride lda) -> `packed`: each group of MR rows (the last one R < MR) as
// [k, R] (the R values of one input together), the groups one after another.
static void pack_rows(const float* x, int64_t lda, int64_t rows, int64_t k, float* packed) {
  for (int64_t r0 = 0; r0 < rows; r0 += MR) {
    const int64_t R = std::min(MR, rows - r0);
    float* g = packed + r0 * k;
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t r = 0; r < R; ++r) g[kk * R + r] = x[(r0 + r) * lda + kk];
  }
}

// Panels [p0, p1) of out [m, n] (row stride ldo) = x [m, k] (row stride lda) @ w.T + bias.
static void run_panels(const float* x, int64_t lda, int64_t m, int64_t k, const float* w, const float* bias,
                       float* out, int64_t ldo, int64_t p0, int64_t p1) {
  alignas(64) float c[MAX_ROW_BLOCK * PANEL];  // a [rows, 16] block's partial sums
  const int64_t kb = k_block(k), mb = row_block(k);
  // Each thread packs the rows it is about to use (a copy of ~1% of the block's work): no barrier.
  std::unique_ptr<float[]> a(new float[std::min(mb, m) * k]);  // not zeroed: pack_rows writes what is read
  for (int64_t m0 = 0; m0 < m; m0 += mb) {
    const int64_t rows = std::min(mb, m - m0);
    pack_rows(x + m0 * lda, lda, rows, k, a.get());
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = w + p * k * PANEL;
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        const int64_t kc = std::min(kb, k - k0);
        for (int64_t r = 0; r < rows; r += MR) {
          const int64_t R = std::min(MR, rows - r);
          BLOCKS[R](kc, a.get() + r * k + k0 * R, panel + k0 * PANEL, c + r * PANEL, k0 > 0);
        }
      }
      const __m256 b0 = bias ? _mm256_loadu_ps(bias + p * PANEL) : _mm256_setzero_ps();
      const __m256 b1 = bias ? _mm256_loadu_ps(bias + p * PANEL + 8) : _mm256_setzero_ps();
      for (int64_t r = 0; r < rows; ++r) {
        float* o = out + (m0 + r) * ldo + p * PANEL;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_load_ps(c + r * PANEL), b0));
        _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_load_ps(c + r * PANEL + 8), b1));
      }
    }
  }
}
constexpr bool COMPILED = true;
#else
constexpr bool COMPILED = false;
#endif

bool avx2_supported() { return COMPILED && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t n) {
  TORCH_CHECK(avx2_supported(), "avx2 linear: this CPU or build has no AVX2/FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "avx2 linear: x must be fp32 [rows, in] with contiguous rows");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k > 0 && w.scalar_type() == at::kFloat && w.is_contiguous() && n % 16 == 0 && w.numel() == n * k,
              "avx2 linear: packed weight does not match x [rows, in]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous()),
              "avx2 linear: bias must be fp32 [out]");
  auto out = torch::empty({m, n}, x.options());
#if defined(__AVX2__) && defined(__FMA__)
  if (m == 0) return out;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, n / PANEL, 1, [&](int64_t p0, int64_t p1) {
    run_panels(x.data_ptr<float>(), x.stride(0), m, k, w.data_ptr<float>(), b, out.data_ptr<float>(), n, p0, p1);
  });
#endif
  return out;
}
"""

load = lazy_build("batchgen_cpu_avx2_linear", _SOURCE, ["avx2_supported", "linear"])


@functools.cache
def available() -> bool:
    """True on AVX2/FMA CPUs without AVX-512 (where torch's own fp32 GEMMs use 512-bit registers and
    this kernel has nothing to add), once the kernel is built."""
    flags = cpu_flags() or set()
    if not {"avx2", "fma"} <= flags or "avx512f" in flags:
        return False
    module = load()
    return module is not None and bool(module.avx2_supported())


def supports(out_features: int, in_features: int) -> bool:
    return out_features % PANEL == 0 and out_features > 0 and in_features > 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> the panel layout [out / 16, in, 16] (module docstring)."""
    n, k = weight.shape
    return huge_pages.contiguous(weight.detach().float().view(n // PANEL, PANEL, k).transpose(1, 2))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [rows, in] fp32 (any row stride) -> [rows, out]; bias fp32 [out] or None."""
    return load().linear(x if x.stride(-1) == 1 else x.contiguous(), packed, bias, out_features)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same sums in float64, rounded once to fp32 (weight dense [out, in])."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()
