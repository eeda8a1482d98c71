"""The mixture-of-experts MLP on CPU in one C++ call (compiled on first use): routing sort, every
expert's gate_up GEMM + SiLU * up, its down GEMM and the routed-weight sum, parallel over
(expert, output tile).

Semantics (those of kernels/fused_moe.py; `moe_experts_ref` below is the torch reference):
    for every token t and each of its top-k picks (e = ids[t, j], p = weights[t, j]):
        gate, up = (x[t] @ w13[e].T).split(inter)             # w13 [experts, 2 * inter, hidden]
        out[t] += p * ((silu(gate) * up) @ w2[e].T)           # w2 [experts, hidden, inter]
    Everything after reading x and the weights is fp32 (GEMM sums, silu * up, the sum over picks);
    out rounds once to x's dtype. x [tokens, hidden] fp32 or bf16; weights [tokens, k] fp32;
    ids [tokens, k] int64; out [tokens, hidden].

Why: at decode sizes the torch path is a Python loop of 3 ops per expert over ~16 rows each, plus
the sort, gathers and the weighted sum; this runs them as two passes with no op boundaries.

Layout (`pack_experts`, once at load; the dense stacks are then dropped): the weights are cut into
column panels that the micro-kernel streams with unit stride:
    gate_up [experts, inter_p / 8, hidden, 16]: per panel, gate columns c..c+7 then up columns c..c+7
    down    [experts, hidden_p / 16, inter_p, 16]: per panel, 16 output columns
with inter_p, hidden_p the sizes rounded up to 8 / 16 (zero padding: a zero gate gives silu(0) * 0
= 0, and zero down rows and columns add nothing). Pass 1 runs over (expert, gate_up panel) units:
up to 6 of the expert's rows at once, each weight vector loaded once for the 6 rows (12 fp32
accumulators of 8 lanes: GCC vector types, AVX2 + FMA here, AVX-512 machines use the same 256-bit
code). Pass 2 runs over down panels: each unit owns 16 output columns of every token, so the sum
over experts needs no atomics, and adds the experts in a fixed order (deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._cpu_build import lazy_build

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

typedef float v8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <typename W> static inline v8 load8(const W* p);
template <> inline v8 load8<float>(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <> inline v8 load8<at::BFloat16>(const at::BFloat16* p) {  // widen: bf16 bits << 16
  u16x8 s;
  std::memcpy(&s, p, sizeof(s));
  const u32x8 w = __builtin_convertvector(s, u32x8) << 16;
  v8 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
static inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

constexpr int kRows = 6;  // rows per micro-kernel call: 2 * kRows accumulators + 2 weight vectors

// h[r][0:8] = silu(x_r . gate columns) * (x_r . up columns) for M rows and one gate_up panel.
template <int M, typename W>
static inline void gate_up_tile(const float* const* xr, const W* panel, int64_t hidden, float* const* hr) {
  v8 g[M], u[M];
  for (int r = 0; r < M; ++r) g[r] = u[r] = v8{};
  for (int64_t k = 0; k < hidden; ++k) {
    const v8 wg = load8(panel + k * 16), wu = load8(panel + k * 16 + 8);
    for (int r = 0; r < M; ++r) {
      const float xv = xr[r][k];
      g[r] += wg * xv;
      u[r] += wu * xv;
    }
  }
  for (int r = 0; r < M; ++r) {
    float gs[8], us[8];
    store8(gs, g[r]);
    store8(us, u[r]);
    for (int i = 0; i < 8; ++i) hr[r][i] = gs[i] / (1.f + std::exp(-gs[i])) * us[i];
  }
}

// acc[t][0:16] += p_r * (h_r . down panel) for M rows (token t_r, routed weight p_r).
template <int M, typename W>
static inline void down_tile(const float* const* hr, const W* panel, int64_t inter, const float* p,
                             float* const* acc) {
  v8 lo[M], hi[M];
  for (int r = 0; r < M; ++r) lo[r] = hi[r] = v8{};
  for (int64_t k = 0; k < inter; ++k) {
    const v8 w0 = load8(panel + k * 16), w1 = load8(panel + k * 16 + 8);
    for (int r = 0; r < M; ++r) {
      const float hv = hr[r][k];
      lo[r] += w0 * hv;
      hi[r] += w1 * hv;
    }
  }
  for (int r = 0; r < M; ++r) {
    float a[16];
    store8(a, lo[r] * p[r]);
    store8(a + 8, hi[r] * p[r]);
    for (int i = 0; i < 16; ++i) acc[r][i] += a[i];
  }
}

template <typename F> static inline void by_rows(int m, F&& f) {
  switch (m) {
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <typename T>
static void moe_impl(const torch::Tensor& x, const torch::Tensor& gate_up, const torch::Tensor& down,
                     const torch::Tensor& weights, const torch::Tensor& ids, torch::Tensor& out) {
  const int64_t tokens = x.size(0), hidden = x.size(1), k = ids.size(1), experts = gate_up.size(0);
  const int64_t up_panels = gate_up.size(1), inter_p = up_panels * 8, down_panels = down.size(1);
  const int64_t rows = tokens * k;
  // Counting sort of the (token, pick) rows by expert, stable: row order within an expert is token order.
  const int64_t* idp = ids.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  std::vector<int64_t> start(experts + 1, 0);
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(idp[i] >= 0 && idp[i] < experts, "moe_experts: expert id ", idp[i], " out of range [0, ", experts, ")");
    ++start[idp[i] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> row_token(rows), fill(start.begin(), start.end() - 1);
  std::vector<float> row_p(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t slot = fill[idp[i]]++;
    row_token[slot] = i / k;
    row_p[slot] = wp[i];
  }
  // x in fp32, once (the micro-kernel broadcasts its elements), and the [rows, inter_p] activations.
  std::vector<float> xf(tokens * hidden), h(rows * inter_p);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) load_row(xp + t * x.stride(0), xf.data() + t * hidden, hidden);
  });
  // Pass 1: units (expert, gate_up panel) over the experts that got rows.
  std::vector<int64_t> used;
  for (int64_t e = 0; e < experts; ++e) if (start[e + 1] > start[e]) used.push_back(e);
  const T* gp = gate_up.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(used.size()) * up_panels, 1, [&](int64_t b, int64_t end) {
    const float* xr[kRows];
    float* hr[kRows];
    for (int64_t unit = b; unit < end; ++unit) {
      const int64_t e = used[unit / up_panels], panel = unit % up_panels;
      const T* w = gp + (e * up_panels + panel) * hidden * 16;
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kRows) {
        const int m = static_cast<int>(std::min<int64_t>(kRows, start[e + 1] - r0));
        for (int r = 0; r < m; ++r) {
          xr[r] = xf.data() + row_token[r0 + r] * hidden;
          hr[r] = h.data() + (r0 + r) * inter_p + panel * 8;
        }
        by_rows(m, [&](auto M) { gate_up_tile<decltype(M)::value>(xr, w, hidden, hr); });
      }
    }
  });
  // Pass 2: units = down panels (16 output columns of every token); experts in order.
  const T* dp = down.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, down_panels, 1, [&](int64_t b, int64_t end) {
    std::vector<float> acc(tokens * 16);
    const float* hr[kRows];
    float* ar[kRows];
    float p[kRows];
    for (int64_t panel = b; panel < end; ++panel) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t e : used) {
        const T* w = dp + (e * down_panels + panel) * inter_p * 16;
        for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += kRows) {
          const int m = static_cast<int>(std::min<int64_t>(kRows, start[e + 1] - r0));
          for (int r = 0; r < m; ++r) {
            hr[r] = h.data() + (r0 + r) * inter_p;
            ar[r] = acc.data() + row_token[r0 + r] * 16;
            p[r] = row_p[r0 + r];
          }
          by_rows(m, [&](auto M) { down_tile<decltype(M)::value>(hr, w, inter_p, p, ar); });
        }
      }
      const int64_t c0 = panel * 16, width = std::min<int64_t>(16, hidden - c0);
      for (int64_t t = 0; t < tokens; ++t) store_row(acc.data() + t * 16, op + t * out.stride(0) + c0, width);
    }
  });
}

torch::Tensor moe_experts(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor weights,
                          torch::Tensor ids) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "moe_experts: x must be [tokens, hidden] with a contiguous hidden dim");
  TORCH_CHECK(gate_up.dim() == 4 && gate_up.size(2) == x.size(1) && gate_up.size(3) == 16 && gate_up.is_contiguous(),
              "moe_experts: gate_up must be packed [experts, inter_p / 8, hidden, 16] (pack_experts)");
  TORCH_CHECK(down.dim() == 4 && down.size(0) == gate_up.size(0) && down.size(1) * 16 >= x.size(1) &&
              down.size(2) == gate_up.size(1) * 8 && down.size(3) == 16 && down.is_contiguous(),
              "moe_experts: down must be packed [experts, hidden_p / 16, inter_p, 16] (pack_experts)");
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type(),
              "moe_experts: x and the packed weights must share a dtype");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && weights.sizes() == ids.sizes(),
              "moe_experts: ids and weights must be [tokens, k]");
  auto ids_c = ids.to(torch::kInt64).contiguous();
  auto w_c = weights.to(torch::kFloat32).contiguous();
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    moe_impl<float>(x, gate_up, down, w_c, ids_c, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "moe_experts: fp32 or bf16 only");
    moe_impl<at::BFloat16>(x, gate_up, down, w_c, ids_c, out);
  }
  return out;
}
"""

load = lazy_build("batchgen_cpu_moe", _SOURCE, ["moe_experts"])

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H], w2 [E, H, I] -> the kernel's panels (module docstring), same dtype."""
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    inter_p, hidden_p = -(-inter // 8) * 8, -(-hidden // 16) * 16
    gate = F.pad(w13[:, :inter], (0, 0, 0, inter_p - inter))  # [E, inter_p, H]
    up = F.pad(w13[:, inter:], (0, 0, 0, inter_p - inter))
    panels = inter_p // 8
    gate = gate.reshape(experts, panels, 8, hidden).transpose(2, 3)  # [E, panels, H, 8]
    up = up.reshape(experts, panels, 8, hidden).transpose(2, 3)
    gate_up = torch.cat([gate, up], dim=-1).contiguous()  # [E, inter_p / 8, H, 16]
    down = F.pad(w2, (0, inter_p - inter, 0, hidden_p - hidden))  # [E, hidden_p, inter_p]
    down = down.reshape(experts, hidden_p // 16, 16, inter_p).transpose(2, 3).contiguous()  # [E, hp/16, ip, 16]
    return gate_up, down


def moe_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """x [tokens, hidden] -> [tokens, hidden]; gate_up, down from `pack_experts`."""
    return load().moe_experts(x, gate_up, down, weights, ids)


def moe_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """The reference: per (token, pick) row, its expert's two GEMMs in fp32; one rounding at the end."""
    t, k = ids.shape
    inter = w2.shape[2]
    rows = x.float().repeat_interleave(k, dim=0)  # [t * k, hidden]
    e = ids.reshape(-1)
    gate_up = torch.einsum("rh,rnh->rn", rows, w13[e].float())  # [t * k, 2 * inter]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch.einsum("ri,rhi->rh", h, w2[e].float()) * weights.reshape(-1, 1).float()  # [t * k, hidden]
    return y.view(t, k, -1).sum(1).to(x.dtype)
