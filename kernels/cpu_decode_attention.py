"""Decode attention over the paged KV cache on CPU, in C++ (compiled on first use).

Semantics, per row r and query head h (one query token per row; kv head = h // (heads / kv_heads)):
    K_r = the first ctx_lens[r] tokens of row r's blocks, read in place from the paged cache
    out[r, h] = softmax(q[r, h] @ K_r[:, kv].T * scale) @ V_r[:, kv]
    window > 0 (sliding-window attention): only the last `window` keys count, positions > pos - window
    where pos = ctx_lens[r] - 1 is the query's; window == 0: all of them.
Shapes: q [rows, heads, head_dim]; k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim];
block_tables [rows, max_blocks] int64; ctx_lens [rows] int64; out [rows, heads, head_dim].

The torch path gathers every row's context into a padded copy per layer and reads it again in
SDPA; this reads each K/V vector once, straight from its block, for every query head of its KV
head (their dot products four heads at a time, independent FMA chains). `decode_attention_ref` beside it is the torch reference.
"""

from __future__ import annotations

import torch

from kernels._cpu_build import lazy_build

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

// D > 0: the head size as a compile-time constant (the dot products unroll fully); D == 0: any size.
template <typename T, int D>
static void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& block_tables, const torch::Tensor& ctx_lens, double scale,
                                  int64_t window, torch::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), d = D > 0 ? D : q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = ctx_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * d;  // one token's K (or V) of every KV head: contiguous
  // A job is one row, or one (row, KV head) when there are too few rows to keep every thread busy.
  const int64_t split = rows >= 4 * at::get_num_threads() ? 1 : kv_heads;
  const int64_t heads_per_job = kv_heads / split;

  at::parallel_for(0, rows * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * d), acc(heads * d), kf(token_stride), scores;
    std::vector<int64_t> kv_offset(heads);  // where head h's KV head sits in a token's row (no division in the loops)
    for (int64_t h = 0; h < heads; ++h) kv_offset[h] = (h / group) * d;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / split, kv0 = (job % split) * heads_per_job, kv1 = kv0 + heads_per_job;
      const int64_t h0 = kv0 * group, h1 = kv1 * group, ctx = lens[r];
      const int64_t* table = tables + r * max_blocks;
      scores.resize(heads * ctx);
      load_row(qp + (r * heads + h0) * d, qf.data() + h0 * d, (h1 - h0) * d);
      for (int64_t i = h0 * d; i < h1 * d; ++i) qf[i] *= static_cast<float>(scale);
      // Scores: block by block (no division per token), each token's keys read once for every
      // query head of the job's KV heads.
      for (int64_t b = 0, t = 0; t < ctx; ++b) {
        const T* kblock = kp + table[b] * block_size * token_stride;
        for (int64_t j = 0; j < block_size && t < ctx; ++j, ++t) {
          load_row(kblock + j * token_stride + kv0 * d, kf.data() + kv0 * d, (kv1 - kv0) * d);
          int64_t h = h0;
          for (; h + 4 <= h1; h += 4) {  // four heads at a time: independent FMA chains
            float s4[4];
            const float* k0 = kf.data();
            dot4(qf.data() + h * d, qf.data() + (h + 1) * d, qf.data() + (h + 2) * d, qf.data() + (h + 3) * d,
                 k0 + kv_offset[h], k0 + kv_offset[h + 1], k0 + kv_offset[h + 2], k0 + kv_offset[h + 3], d, s4);
            for (int64_t u = 0; u < 4; ++u) scores[(h + u) * ctx + t] = s4[u];
          }
          for (; h < h1; ++h) scores[h * ctx + t] = dot(qf.data() + h * d, kf.data() + kv_offset[h], d);
        }
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;  // sliding window: older keys get 0
      for (int64_t h = h0; h < h1; ++h) {
        float* sh = scores.data() + h * ctx;
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < first; ++t) sh[t] = 0.f;
        for (int64_t t = first; t < ctx; ++t) m = std::max(m, sh[t]);
        for (int64_t t = first; t < ctx; ++t) { sh[t] = std::exp(sh[t] - m); sum += sh[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = first; t < ctx; ++t) sh[t] *= inv;
      }
      std::fill(acc.begin() + h0 * d, acc.begin() + h1 * d, 0.f);
      for (int64_t b = 0, t = 0; t < ctx; ++b) {
        const T* vblock = vp + table[b] * block_size * token_stride;
        for (int64_t j = 0; j < block_size && t < ctx; ++j, ++t) {
          load_row(vblock + j * token_stride + kv0 * d, kf.data() + kv0 * d, (kv1 - kv0) * d);
          for (int64_t h = h0; h < h1; ++h) {
            const float p = scores[h * ctx + t];
            const float* vh = kf.data() + kv_offset[h];
            float* a = acc.data() + h * d;
            for (int64_t i = 0; i < d; ++i) a[i] += p * vh[i];
          }
        }
      }
      T* o = op + (r * heads + h0) * d;
      for (int64_t i = 0; i < (h1 - h0) * d; ++i) o[i] = static_cast<T>(acc[h0 * d + i]);
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous inputs");
  auto out = torch::empty_like(q);
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = ctx_lens.to(torch::kInt64).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    switch (q.size(2)) {
      case 64: decode_attention_impl<scalar_t, 64>(q, k_cache, v_cache, tables, lens, scale, window, out); break;
      case 128: decode_attention_impl<scalar_t, 128>(q, k_cache, v_cache, tables, lens, scale, window, out); break;
      default: decode_attention_impl<scalar_t, 0>(q, k_cache, v_cache, tables, lens, scale, window, out);
    }
  });
  return out;
}
"""

load = lazy_build("batchgen_cpu_decode_attention", _SOURCE, ["decode_attention"])


def decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, window: int = 0) -> torch.Tensor:
    return load().decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale, int(window))


def decode_attention_ref(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, window: int = 0) -> torch.Tensor:
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
        s = torch.einsum("hd,thd->ht", q[r].float() * scale, k)
        if window > 0:
            s[:, :max(0, ctx - window)] = float("-inf")
        p = s.softmax(-1)
        out[r] = torch.einsum("ht,thd->hd", p, v).to(q.dtype)
    return out
