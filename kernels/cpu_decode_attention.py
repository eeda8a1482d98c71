"""Decode attention over the paged KV cache on CPU, in C++ (compiled on first use).

Semantics, per row r and query head h (one query token per row; kv head = h // (heads / kv_heads)):
    K_r = the first ctx_lens[r] tokens of row r's blocks, read in place from the paged cache
    out[r, h] = softmax(q[r, h] @ K_r[:, kv].T * scale) @ V_r[:, kv]
Shapes: q [rows, heads, head_dim]; k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim];
block_tables [rows, max_blocks] int64; ctx_lens [rows] int64; out [rows, heads, head_dim].

The torch path gathers every row's context into a padded copy per layer and reads it again in
SDPA; this reads each K/V vector once, straight from its block, the query heads of one KV head
together. `decode_attention_ref` beside it is the torch reference.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("batchgen")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// Widening to fp32: bf16 is the top half of an fp32, a shift the compiler vectorizes; others cast.
template <typename T>
static inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void to_float<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

template <typename T>
static void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& block_tables, const torch::Tensor& ctx_lens, double scale,
                                  torch::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * d;  // between tokens of one block

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), scores, kf(d);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / kv_heads, kvh = job % kv_heads, ctx = lens[r];
      scores.assign(group * ctx, 0.f);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < d; ++i)
          qf[g * d + i] = static_cast<float>(qp[(r * heads + kvh * group + g) * d + i]) * static_cast<float>(scale);
      // Scores: each key vector is read once for the whole group of query heads.
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t block = tables[r * max_blocks + t / block_size];
        const T* k = kp + (block * block_size + t % block_size) * token_stride + kvh * d;
        to_float(k, kf.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          float s = 0.f;
          const float* qg = qf.data() + g * d;
          for (int64_t i = 0; i < d; ++i) s += qg[i] * kf[i];
          scores[g * ctx + t] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * ctx;
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) m = std::max(m, sg[t]);
        for (int64_t t = 0; t < ctx; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t block = tables[r * max_blocks + t / block_size];
        const T* v = vp + (block * block_size + t % block_size) * token_stride + kvh * d;
        to_float(v, kf.data(), d);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * ctx + t];
          float* a = acc.data() + g * d;
          for (int64_t i = 0; i < d; ++i) a[i] += p * kf[i];
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < d; ++i)
          op[(r * heads + kvh * group + g) * d + i] = static_cast<T>(acc[g * d + i]);
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  auto out = torch::empty_like(q);
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = ctx_lens.to(torch::kInt64).contiguous();
  if (q.scalar_type() == torch::kFloat) {
    decode_attention_impl<float>(q, k_cache, v_cache, tables, lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    decode_attention_impl<at::BFloat16>(q, k_cache, v_cache, tables, lens, scale, out);
  } else if (q.scalar_type() == torch::kHalf) {
    decode_attention_impl<at::Half>(q, k_cache, v_cache, tables, lens, scale, out);
  } else {
    TORCH_CHECK(false, "decode_attention: unsupported dtype");
  }
  return out;
}
"""

_module = None
_failed = False


def load():
    """The compiled extension, or None when it cannot be built here (the caller falls back to torch)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("BATCHGEN_CPU_KERNELS", "1") == "0":
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name="batchgen_cpu_decode_attention",
            cpp_sources=[_SOURCE],
            functions=["decode_attention"],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers: the torch path still works
        logger.warning("CPU decode attention kernel unavailable (%s); using the torch path", str(e).splitlines()[0])
        _failed = True
    return _module


def decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale: float) -> torch.Tensor:
    return load().decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale)


def decode_attention_ref(q, k_cache, v_cache, block_tables, ctx_lens, scale: float) -> torch.Tensor:
    rows, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for r in range(rows):
        ctx = int(ctx_lens[r])
        blocks = block_tables[r, :-(-ctx // block_size)]
        k = k_cache[blocks].reshape(-1, kv_heads, d)[:ctx].float()  # [ctx, kv_heads, d]
        v = v_cache[blocks].reshape(-1, kv_heads, d)[:ctx].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # [ctx, heads, d]
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        p = torch.einsum("hd,thd->ht", q[r].float() * scale, k).softmax(-1)
        out[r] = torch.einsum("ht,thd->hd", p, v).to(q.dtype)
    return out
