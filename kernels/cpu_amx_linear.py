"""bf16 linear layers on Intel AMX tiles (C++, compiled on first use), made for decode row counts.

Semantics: `linear(x, w, bias)` is `F.linear(x, weight, bias)` for bf16 x [rows, in] and weight
[out, in]: fp32 sums of exact bf16 products (plus the bias in fp32), rounded once to bf16 — equal to
oneDNN's result up to fp32 summation order. `gate_up(x, w, bias, silu_mul=True)` is
`silu_mul(F.linear(x, weight, bias))` for a fused [gate; up] weight [2 * inter, in], with the same
roundings as the two-op path (gate and up rounded to bf16, SiLU rounded, the product rounded);
with `silu_mul=False` it returns the [rows, 2 * inter] projection itself (what LoRA adds to).

Why: at decode shapes (64 rows x 576 in) oneDNN's packed bf16 GEMM streams the embedded model's
weights at 12-14 GB/s of this VM's ~22: its time is about the memory time plus the AMX time, not
the larger of the two. Here each thread streams one contiguous range of 1 KB weight tiles; a unit
of two 16-column panels is multiplied by 32 rows at a time (four 16x16 fp32 accumulator tiles, so
each A and B tile loaded feeds two products), the weights coming from memory for the first 32 rows
and from cache for the rest; the epilogue converts in AVX-512 registers, and for the SwiGLU
projection applies the activation there, so the [rows, 2 * inter] projection never goes to memory.
Rows go in blocks of 256, whose input stays in L2 while the weights stream by once per block.

Layouts (`pack`, `pack_gate_up`; built once at load time, the dense weight is dropped):
  plain   [out / 16, in / 32, 16, 16, 2]: panel p (16 output columns), k-step s (32 inputs), the
          AMX B tile in VNNI order: element [r, c, e] = weight[16 p + c, 32 s + 2 r + e];
  gate_up [inter / 16, in / 32, 2, 16, 16, 2]: the gate tile and the up tile of the same 16 columns
          side by side, so one sequential stream feeds both.
Needs in % 32 == 0 and out % 16 == 0 (`supports`); other shapes and other CPUs keep oneDNN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import huge_pages
from ._cpu_build import cpu_flags, lazy_build

TILE_N, TILE_K = 16, 32  # one bf16 B tile: 32 inputs x 16 output columns (1 KB)

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>

constexpr int64_t TILE_ROWS = 16;      // rows of an A / C tile
constexpr int64_t TILE_COLS = 16;      // output columns of a B / C tile
constexpr int64_t TILE_K = 32;         // bf16 inputs per A row / B tile
constexpr int64_t TILE_ELEMS = 512;    // bf16 values in one B tile
constexpr int64_t TILE_BYTES = 1024;
constexpr int64_t C_TILE_FLOATS = 256; // one 16x16 fp32 accumulator tile
constexpr int64_t M_BLOCK = 256;       // rows whose input slice stays in L2 while the weights stream by

// Tiles (configure_tiles, the shared prelude's amx_ready decides): C tiles 0-3 (fp32 16x16), A tiles
// 4-5 (16 rows x 32 bf16), B tiles 6-7.

// Software prefetch of the weight stream into L2, PREFETCH_AHEAD bytes ahead of the tiles being
// loaded. With the hardware prefetcher alone the stream ran at 12-14 GB/s of the ~19 a plain read
// gets on this VM: the AMX work and the epilogues between tile loads leave it idle. Measured (2
// threads, cold weights, a step's 30 layers of q/k/v, o, gate_up, down): 1.09x at 16 rows, 1.08x at
// 64, 1.02-1.18x at 128, 1.07x at 256, 1.06x at 512; none at 1 row (already at the read rate). L1
// hints (T0) or prefetches spread over every row group were slower.
constexpr int64_t PREFETCH_AHEAD = 16384;
static inline void prefetch_weights(const uint16_t* at, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(at) + PREFETCH_AHEAD;
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T1);
}

// C tiles 0..MT-1 = rows [0, 16 MT) of `a` times one panel `b` (k-steps of one B tile each).
// `prefetch`: this call is the first to read the panel, from memory (prefetch_weights).
template <int MT>
static inline void plain_block(const uint16_t* a, int64_t lda_bytes, const uint16_t* b, int64_t ksteps, float* c,
                               bool prefetch) {
  _tile_zero(0);
  if constexpr (MT > 1) _tile_zero(1);
  const int64_t a_rows16 = 16 * (lda_bytes / 2);  // elements between A tiles 16 rows apart
  for (int64_t s = 0; s < ksteps; ++s) {
    _tile_loadd(6, b + s * TILE_ELEMS, 64);
    if (prefetch) prefetch_weights(b + s * TILE_ELEMS, TILE_BYTES);
    const uint16_t* at = a + s * TILE_K;
    _tile_loadd(4, at, lda_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT > 1) { _tile_loadd(5, at + a_rows16, lda_bytes); _tile_dpbf16ps(1, 5, 6); }
  }
  _tile_stored(0, c, 64);
  if constexpr (MT > 1) _tile_stored(1, c + C_TILE_FLOATS, 64);
}

// Two panels at once: C tiles 0..MT-1 = rows [0, 16 MT) x panel 0, tiles 2..2+MT-1 = the same rows x
// panel 1 (B tiles 6, 7). The k-step s of panel j is at b[j] + s * b_step: two separate panels of the
// plain layout (b_step one tile), or a gate/up pair of the gate_up layout (b_step two tiles).
// Each A tile feeds two products, each B tile MT: half the tile loads per product of plain_block.
// Either way the unit's two panels are one contiguous range, used 2 tiles a k-step from b0 on: the
// prefetch walks it at that rate.
template <int MT>
static inline void pair_block(const uint16_t* a, int64_t lda_bytes, const uint16_t* b0, const uint16_t* b1,
                              int64_t b_step, int64_t ksteps, float* c, bool prefetch) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (MT > 1) { _tile_zero(1); _tile_zero(3); }
  const int64_t a_rows16 = 16 * (lda_bytes / 2);
  for (int64_t s = 0; s < ksteps; ++s) {
    _tile_loadd(6, b0 + s * b_step, 64);
    _tile_loadd(7, b1 + s * b_step, 64);
    if (prefetch) prefetch_weights(b0 + s * 2 * TILE_ELEMS, 2 * TILE_BYTES);
    const uint16_t* at = a + s * TILE_K;
    _tile_loadd(4, at, lda_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    if constexpr (MT > 1) {
      _tile_loadd(5, at + a_rows16, lda_bytes);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(2, c + 2 * C_TILE_FLOATS, 64);
  if constexpr (MT > 1) { _tile_stored(1, c + C_TILE_FLOATS, 64); _tile_stored(3, c + 3 * C_TILE_FLOATS, 64); }
}

static inline __m512 round_bf16(__m512 x) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x)); }
static inline void store_bf16(at::BFloat16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}
static inline __m512 with_bias(const float* c, const float* bias) {
  const __m512 v = _mm512_load_ps(c);
  return bias ? _mm512_add_ps(v, _mm512_loadu_ps(bias)) : v;
}

// One accumulator tile's valid rows -> bf16 output rows (columns [0, 16) of `out` + row * ldo).
static inline void store_tile(const float* c, int64_t rows, const float* bias, at::BFloat16* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) store_bf16(out + r * ldo, with_bias(c + r * TILE_COLS, bias));
}

// silu(bf16(gate)) rounded, times bf16(up), rounded: the two-op path's roundings (cpu_ops.silu_mul).
static inline void store_silu_mul(const float* g, const float* u, int64_t rows, const float* bg, const float* bu,
                                  at::BFloat16* out, int64_t ldo) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 x = round_bf16(with_bias(g + r * TILE_COLS, bg));
    const __m512 up = round_bf16(with_bias(u + r * TILE_COLS, bu));
    // A rounded division: -ffast-math would make x / y into x * (1 / y), two roundings.
    const __m512 silu = _mm512_div_round_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store_bf16(out + r * ldo, _mm512_mul_ps(round_bf16(silu), up));
  }
}

// Work is split into units of two B panels (16 output columns each) that are multiplied together:
// two neighbouring panels of the plain layout (the last one alone when their count is odd), or one
// gate/up pair of the gate_up layout.
struct Layout {
  const uint16_t* w;   // packed weight
  int64_t ksteps;      // k / 32
  int64_t n;           // output columns of the projection
  int64_t inter;       // gate_up layout: columns per half (0: plain layout)
  bool silu_mul;       // gate_up layout: write silu(gate) * up instead of [gate, up]
  int64_t units() const { return inter ? inter / TILE_COLS : (n / TILE_COLS + 1) / 2; }
  int64_t ldo() const { return inter && silu_mul ? inter : n; }
};

// Units [u0, u1) for rows [0, m_pad) of x (rows >= m are padding, not stored).
static void run_units(const uint16_t* x, int64_t m, int64_t m_pad, int64_t k, const Layout& L, const float* bias,
                      at::BFloat16* out, int64_t u0, int64_t u1) {
  const int64_t lda = 2 * k, ldo = L.ldo(), panel = L.ksteps * TILE_ELEMS;
  alignas(64) float c[4 * C_TILE_FLOATS];
  // Up to 128 rows, each unit's weights are multiplied by every row group in turn (the later groups
  // read them from L1). Beyond, chunks of 16 units (~1 MB of weights at in = 576, kept in L2) are
  // taken row group by row group, so that the output is written in runs along its rows: one unit's
  // columns in 256 rows 96 KB apart (the LM head's row stride) fall into 4 L2 sets, and thrash.
  const int64_t chunk = m_pad <= 128 ? 1 : 16;
  for (int64_t mb = 0; mb < m_pad; mb += M_BLOCK) {
    const int64_t me = std::min(m_pad, mb + M_BLOCK);
    for (int64_t uc = u0; uc < u1; uc += chunk) {
      const int64_t ue = std::min(u1, uc + chunk);
      for (int64_t mg = mb; mg < me; mg += 2 * TILE_ROWS) {
        const uint16_t* a = x + mg * k;
        const int64_t mt = std::min<int64_t>(2, (me - mg) / TILE_ROWS);
        for (int64_t u = uc; u < ue; ++u) {
          // B panels, their k-step stride, and where their columns go in the output
          const uint16_t *b0, *b1;
          int64_t step, col0, col1;
          if (L.inter) {
            b0 = L.w + 2 * u * panel; b1 = b0 + TILE_ELEMS; step = 2 * TILE_ELEMS;
            col0 = u * TILE_COLS; col1 = L.inter + col0;
          } else {
            b0 = L.w + 2 * u * panel; b1 = 2 * u + 1 < L.n / TILE_COLS ? b0 + panel : nullptr; step = TILE_ELEMS;
            col0 = 2 * u * TILE_COLS; col1 = col0 + TILE_COLS;
          }
          const bool from_memory = mg == mb;  // later row groups of the block find the unit in cache
          if (b1) {
            if (mt == 2) pair_block<2>(a, lda, b0, b1, step, L.ksteps, c, from_memory);
            else pair_block<1>(a, lda, b0, b1, step, L.ksteps, c, from_memory);
          } else {
            if (mt == 2) plain_block<2>(a, lda, b0, L.ksteps, c, from_memory);
            else plain_block<1>(a, lda, b0, L.ksteps, c, from_memory);
          }
          for (int64_t t = 0; t < mt; ++t) {
            const int64_t row = mg + t * TILE_ROWS, rows = std::min<int64_t>(TILE_ROWS, m - row);
            if (rows <= 0) continue;
            const float* g = c + t * C_TILE_FLOATS;        // panel 0 (gate)
            const float* h = c + (2 + t) * C_TILE_FLOATS;  // panel 1 (up)
            const float* bias0 = bias ? bias + col0 : nullptr;
            const float* bias1 = bias ? bias + col1 : nullptr;
            if (L.inter && L.silu_mul) {
              store_silu_mul(g, h, rows, bias0, bias1, out + row * ldo + col0, ldo);
            } else {
              store_tile(g, rows, bias0, out + row * ldo + col0, ldo);
              if (b1) store_tile(h, rows, bias1, out + row * ldo + col1, ldo);
            }
          }
        }
      }
    }
  }
}

// x [m, k] bf16, contiguous, rows padded to a multiple of 16 (m_pad); each thread takes a contiguous
// range of units, so it streams one contiguous range of the packed weight.
static void run(const uint16_t* x, int64_t m, int64_t m_pad, int64_t k, const Layout& L, const float* bias,
                at::BFloat16* out) {
  at::parallel_for(0, L.units(), 1, [&](int64_t u0, int64_t u1) {
    configure_tiles();
    run_units(x, m, m_pad, k, L, bias, out, u0, u1);
    _tile_release();
  });
}
#else
static bool amx_ready() { return false; }
#endif

bool amx_supported() { return amx_ready(); }

// x [m, k] bf16 -> contiguous, rows padded with zeros to a multiple of 16 (an A tile reads 16 rows).
// One allocation and plain copies rather than zeros + narrow + copy_ (three dispatched tensor ops,
// ~1 us a decode-sized call).
static torch::Tensor padded_rows(const torch::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), m_pad = (m + 15) / 16 * 16;
  if (m_pad == m) return x.contiguous();
  const torch::Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  auto p = torch::empty({m_pad, k}, x.options());
  const auto* s = static_cast<const uint16_t*>(src.data_ptr());
  auto* d = static_cast<uint16_t*>(p.data_ptr());
  const int64_t ss = src.stride(0);
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::copy(s + r * ss, s + r * ss + k, d + r * k);
  });
  std::fill(d + m * k, d + m_pad * k, uint16_t{0});
  return p;
}

static void check_inputs(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                         int64_t n) {
  TORCH_CHECK(amx_ready(), "amx linear: this CPU or build has no AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "amx linear: x must be bf16 [rows, in]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == n * x.size(1) &&
              x.size(1) % 32 == 0 && n % 16 == 0, "amx linear: packed weight does not match x [rows, in]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous()),
              "amx linear: bias must be fp32 [out]");
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t n) {
  check_inputs(x, w, bias, n);
  auto out = torch::empty({x.size(0), n}, x.options());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (x.size(0) == 0) return out;
  auto xp = padded_rows(x);
  const Layout L{reinterpret_cast<const uint16_t*>(w.data_ptr()), x.size(1) / 32, n, 0, false};
  run(reinterpret_cast<const uint16_t*>(xp.data_ptr()), x.size(0), xp.size(0), x.size(1), L,
      bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<at::BFloat16>());
#endif
  return out;
}

torch::Tensor gated_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t inter,
                           bool silu_mul) {
  check_inputs(x, w, bias, 2 * inter);
  auto out = torch::empty({x.size(0), silu_mul ? inter : 2 * inter}, x.options());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (x.size(0) == 0) return out;
  auto xp = padded_rows(x);
  const Layout L{reinterpret_cast<const uint16_t*>(w.data_ptr()), x.size(1) / 32, 2 * inter, inter, silu_mul};
  run(reinterpret_cast<const uint16_t*>(xp.data_ptr()), x.size(0), xp.size(0), x.size(1), L,
      bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<at::BFloat16>());
#endif
  return out;
}

std::unordered_map<std::string, int64_t> entry_points() {  // for kernels/cpu_decoder.py
  return {ENTRY_POINT(linear), ENTRY_POINT(gated_linear)};
}
"""

load = lazy_build("batchgen_cpu_amx_linear", _SOURCE,
                  ["amx_supported", "linear", "gated_linear", "entry_points"])


def _cpu_may_have_amx() -> bool:
    """False where Linux's CPU flags say no AMX-BF16 (then the kernel is not even compiled); where
    they can't say (not Linux), the kernel's own CPUID check decides."""
    flags = cpu_flags()
    return flags is None or "amx_bf16" in flags


@functools.cache
def available() -> bool:
    """True when the kernel is built and this CPU (and OS) runs AMX-BF16 tiles."""
    if not _cpu_may_have_amx():
        return False
    module = load()
    return module is not None and bool(module.amx_supported())


def supports(out_features: int, in_features: int) -> bool:
    return in_features % TILE_K == 0 and out_features % TILE_N == 0 and in_features > 0 and out_features > 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> the plain tile layout (module docstring)."""
    n, k = weight.shape
    w = weight.detach().to(torch.bfloat16)
    return huge_pages.contiguous(w.view(n // TILE_N, TILE_N, k // TILE_K, TILE_K // 2, 2).permute(0, 2, 3, 1, 4))


def pack_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """weight [2 * inter, in] ([gate; up]) -> the gate_up tile layout (module docstring)."""
    n, k = weight.shape
    w = weight.detach().to(torch.bfloat16)
    return huge_pages.contiguous(w.view(2, n // 2 // TILE_N, TILE_N, k // TILE_K, TILE_K // 2, 2)
                                 .permute(1, 3, 0, 4, 2, 5))


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [rows, in] bf16 -> [rows, out]; bias fp32 [out] or None."""
    return load().linear(x, packed, bias, out_features)


def gate_up(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, inter: int,
            silu_mul: bool) -> torch.Tensor:
    """x [rows, in] bf16 -> silu(gate) * up [rows, inter], or [gate, up] [rows, 2 * inter] (silu_mul=False)."""
    return load().gated_linear(x, packed, bias, inter, silu_mul)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 sums of the exact products, rounded once to x's dtype (weight dense [out, in])."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def gate_up_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
    projection = linear_ref(x, weight, bias)
    if not silu_mul:
        return projection
    gate, up = projection.chunk(2, dim=-1)
    return F.silu(gate) * up
