"""Fused elementwise ops for the CPU forward, in C++ (compiled on first use), one pass over memory each.

On CPU the unfused torch chain of a small model's layer (RMSNorm's float round trip, SiLU on a
strided half of gate_up, RoPE's five temporaries) costs about as much as its GEMMs. Each op here
reads its input once and writes its output once, parallel over tokens. Semantics are those of the
Triton kernels' torch references (kernels/rms_norm.py, kernels/rotary.py), so one reference checks
both; `silu_mul_ref` and `argmax_ref` sit below.

    rms_norm(x, weight, eps, residual=None)   x, residual [tokens, hidden] (rows may be strided)
        -> out [tokens, hidden], or (out, x + residual) with a residual (see kernels/rms_norm.py)
    silu_mul(gate_up)                          gate_up [tokens, 2 * inter] -> silu(gate) * up [tokens, inter]
        the product rounds silu(gate) to the storage dtype first, as torch's two ops do
    rotary_embedding_(q, k, cos, sin, positions)  q [tokens, heads, d], k [tokens, kv_heads, d]
        rotated in place (fp32 math, one rounding; see kernels/rotary.py); cos, sin [max_pos, d]
    argmax(x)                                  x [rows, n] -> [rows] int64, the first index of the max
    store_kv(k, v, kv_cache, slot_mapping)     kernels/store_kv.py's semantics and reference (store_kv_ref),
        k, v with each row's heads contiguous (rows may be strided: views of the fused qkv)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._cpu_build import lazy_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

template <typename T> static inline float f32(T v) { return static_cast<float>(v); }

#ifdef BF16X16
// One bf16 row of rms_norm in 16-lane vectors, with the generic loop's roundings: h = x (+ r, rounded
// and stored to r_out), then out = bf16(bf16(h / rms(h)) * w). Two passes over the row, no scratch:
// decode-sized calls are a few rows each, where the scratch loops cost more than the math.
static inline void rms_norm_row_bf16(const at::BFloat16* x, const at::BFloat16* r, at::BFloat16* r_out,
                                     const float* w, float eps, int64_t hidden, at::BFloat16* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += 16) {
    const int64_t n = std::min<int64_t>(16, hidden - i);  // lanes past n load as 0 and add nothing
    __m512 h = bf16x16_load(x + i, n);
    if (r) {
      const __m256i hb = bf16x16_bits(_mm512_add_ps(h, bf16x16_load(r + i, n)));
      bf16x16_store_bits(r_out + i, hb, n);
      h = bf16x16_widen(hb);
    }
    ss = _mm512_fmadd_ps(h, h, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / hidden + eps));
  const at::BFloat16* src = r ? r_out : x;
  for (int64_t i = 0; i < hidden; i += 16) {
    const int64_t n = std::min<int64_t>(16, hidden - i);
    const __m512 h = bf16x16_round(_mm512_mul_ps(bf16x16_load(src + i, n), inv));
    const __m512 wv = _mm512_maskz_loadu_ps(n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1), w + i);
    bf16x16_store(out + i, _mm512_mul_ps(h, wv), n);
  }
}
#endif

template <typename T>
static void rms_norm_impl(const torch::Tensor& x, const torch::Tensor* res, const torch::Tensor& w, double eps,
                          torch::Tensor& out, torch::Tensor* res_out) {
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  T* rop = res_out ? res_out->data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), so = out.stride(0), sr = res ? res->stride(0) : 0, sro = res_out ? res_out->stride(0) : 0;
#ifdef BF16X16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    std::vector<float> wf(hidden);
    load_row(wp, wf.data(), hidden);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        rms_norm_row_bf16(xp + t * sx, rp ? rp + t * sr : nullptr, rop ? rop + t * sro : nullptr, wf.data(),
                          static_cast<float>(eps), hidden, op + t * so);
    });
    return;
  }
#endif
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> h(hidden), r(hidden), wf(hidden);
    std::vector<T> tmp(hidden);
    load_row(wp, wf.data(), hidden);
    for (int64_t t = begin; t < end; ++t) {
      load_row(xp + t * sx, h.data(), hidden);
      if (rp) {  // the residual stream is stored rounded, as torch's add does
        load_row(rp + t * sr, r.data(), hidden);
        for (int64_t i = 0; i < hidden; ++i) h[i] += r[i];
        store_row(h.data(), rop + t * sro, hidden);
        load_row(rop + t * sro, h.data(), hidden);
      }
      float ss = 0.f;
      for (int64_t i = 0; i < hidden; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(ss / hidden + static_cast<float>(eps));
      for (int64_t i = 0; i < hidden; ++i) h[i] *= inv;
      round_row(h.data(), tmp.data(), hidden);  // HF rounds the normalised value before the weight
      for (int64_t i = 0; i < hidden; ++i) h[i] *= wf[i];
      store_row(h.data(), op + t * so, hidden);
    }
  });
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [tokens, hidden] with a contiguous hidden dim");
  auto w = weight.to(x.scalar_type()).contiguous();
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  torch::Tensor res_out;
  const torch::Tensor* res = nullptr;
  torch::Tensor* res_o = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "rms_norm: residual must match x");
    res_out = torch::empty_like(out);
    res = &residual.value();
    res_o = &res_out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_impl<scalar_t>(x, res, w, eps, out, res_o); });
  if (res) return {out, res_out};
  return {out};
}

template <typename T>
static void silu_mul_impl(const torch::Tensor& gu, torch::Tensor& out) {
  const int64_t tokens = out.size(0), inter = out.size(1), sg = gu.stride(0);
  const T* gp = gu.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(inter), u(inter);
    std::vector<T> tmp(inter);
    for (int64_t t = begin; t < end; ++t) {
      load_row(gp + t * sg, g.data(), inter);
      load_row(gp + t * sg + inter, u.data(), inter);
      for (int64_t i = 0; i < inter; ++i) g[i] = g[i] / (1.f + std::exp(-g[i]));
      round_row(g.data(), tmp.data(), inter);
      for (int64_t i = 0; i < inter; ++i) g[i] *= u[i];
      store_row(g.data(), op + t * inter, inter);
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be [tokens, 2 * inter] with a contiguous last dim");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] { silu_mul_impl<scalar_t>(gate_up, out); });
  return out;
}

template <typename T>
static void rotate_heads(T* x, int64_t st, int64_t sh, int64_t heads, int64_t half, int64_t t, const T* c, const T* s) {
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + t * st + h * sh;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = f32(v[i]), x2 = f32(v[i + half]);
      v[i] = static_cast<T>(x1 * f32(c[i]) - x2 * f32(s[i]));
      v[i + half] = static_cast<T>(x2 * f32(c[i + half]) + x1 * f32(s[i + half]));
    }
  }
}

#ifdef BF16X16
// One token's heads (x: its first head, heads sh apart) rotated in 16-lane vectors: rotate_heads' math
// for bf16 q/k and tables, with each cos/sin slice widened once for all heads.
static inline void rotate_heads_bf16(at::BFloat16* x, int64_t sh, int64_t heads, int64_t half,
                                     const at::BFloat16* c, const at::BFloat16* s) {
  for (int64_t i = 0; i < half; i += 16) {
    const int64_t n = std::min<int64_t>(16, half - i);
    const __m512 c1 = bf16x16_load(c + i, n), c2 = bf16x16_load(c + half + i, n);
    const __m512 s1 = bf16x16_load(s + i, n), s2 = bf16x16_load(s + half + i, n);
    for (int64_t h = 0; h < heads; ++h) {
      at::BFloat16* v = x + h * sh;
      const __m512 x1 = bf16x16_load(v + i, n), x2 = bf16x16_load(v + half + i, n);
      bf16x16_store(v + i, _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1)), n);
      bf16x16_store(v + half + i, _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2)), n);
    }
  }
}
#endif

template <typename T>
static void rotary_impl(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& pos) {
  const int64_t tokens = q.size(0), half = q.size(2) / 2;
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t sc = cos.stride(0), ss = sin.stride(0);
#ifdef BF16X16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const int64_t sq = q.stride(0), sqh = q.stride(1), hq = q.size(1), sk = k.stride(0), skh = k.stride(1), hk = k.size(1);
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_heads_bf16(qp + t * sq, sqh, hq, half, cp + pp[t] * sc, sp + pp[t] * ss);
        rotate_heads_bf16(kp + t * sk, skh, hk, half, cp + pp[t] * sc, sp + pp[t] * ss);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cp + pp[t] * sc;
      const T* s = sp + pp[t] * ss;
      rotate_heads(qp, q.stride(0), q.stride(1), q.size(1), half, t, c, s);
      rotate_heads(kp, k.stride(0), k.stride(1), k.size(1), half, t, c, s);
    }
  });
}

void rotary_embedding_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && q.size(2) % 2 == 0,
              "rotary_embedding_: q, k must be [tokens, heads, head_dim] with a contiguous head_dim");
  TORCH_CHECK(cos.stride(1) == 1 && sin.stride(1) == 1 && cos.size(1) == q.size(2), "rotary_embedding_: bad cos/sin");
  auto c = cos.to(q.scalar_type()), s = sin.to(q.scalar_type());
  auto pos = positions.to(torch::kInt64).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding_",
                                  [&] { rotary_impl<scalar_t>(q, k, c, s, pos); });
}

template <typename T>
static void store_kv_impl(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& kv_cache, const int64_t* slots) {
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2), sk = k.stride(0), sv = v.stride(0);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* kc = kv_cache.data_ptr<T>();
  T* vc = kc + kv_cache.stride(0);  // V after K
  // A decode step's few rows are copied on the calling thread: waking the pool costs more.
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      std::copy(kp + t * sk, kp + t * sk + row, kc + slots[t] * row);
      std::copy(vp + t * sv, vp + t * sv + row, vc + slots[t] * row);
    }
  });
}

void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor kv_cache, torch::Tensor slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
              k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "store_kv: k, v must be [tokens, kv_heads, head_dim], each row's heads contiguous");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2 &&
              kv_cache.size(3) == k.size(1) && kv_cache.size(4) == k.size(2), "store_kv: kv_cache does not match k, v");
  TORCH_CHECK(k.scalar_type() == kv_cache.scalar_type() && v.scalar_type() == k.scalar_type(), "store_kv: one dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "store_kv: slot_mapping must be [tokens]");
  auto s = slot_mapping.to(torch::kInt64).contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  for (int64_t t = 0; t < s.size(0); ++t)
    TORCH_CHECK(sp[t] < num_slots, "store_kv: slot ", sp[t], " out of range [0, ", num_slots, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "store_kv",
                                  [&] { store_kv_impl<scalar_t>(k, v, kv_cache, sp); });
}

template <typename T>
static void argmax_impl(const torch::Tensor& x, torch::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1), sx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  int64_t* op = out.data_ptr<int64_t>();
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const T* v = xp + r * sx;
      float best = -INFINITY;
      int64_t idx = 0;
      for (int64_t c = 0; c < n; c += kChunk) {  // per chunk: a vectorized max, then its first index
        const int64_t len = std::min(kChunk, n - c);
        load_row(v + c, buf.data(), len);
        float m = -INFINITY;
        for (int64_t i = 0; i < len; ++i) m = std::max(m, buf[i]);
        if (m > best) {
          best = m;
          for (int64_t i = 0; i < len; ++i) if (buf[i] == m) { idx = c + i; break; }
        }
      }
      op[r] = idx;
    }
  });
}

torch::Tensor argmax(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "argmax: x must be [rows, n] with a contiguous last dim");
  auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kInt64));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax",
                                  [&] { argmax_impl<scalar_t>(x, out); });
  return out;
}

std::unordered_map<std::string, int64_t> entry_points() {  // for kernels/cpu_decoder.py
  return {ENTRY_POINT(rms_norm), ENTRY_POINT(rotary_embedding_), ENTRY_POINT(store_kv)};
}
"""

load = lazy_build("batchgen_cpu_ops", _SOURCE,
                  ["rms_norm", "silu_mul", "rotary_embedding_", "argmax", "store_kv", "entry_points"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    out = load().rms_norm(x, weight, eps, residual)
    return out[0] if residual is None else (out[0], out[1])


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return load().silu_mul(gate_up)


def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor) -> None:
    load().rotary_embedding_(q, k, cos, sin, positions)


def argmax(x: torch.Tensor) -> torch.Tensor:
    return load().argmax(x)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    load().store_kv(k, v, kv_cache, slot_mapping)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)
