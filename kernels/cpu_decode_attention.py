"""Decode attention over the paged KV cache on CPU, in C++ (compiled on first use), plain and
shared-prefix (cascade).

Semantics, per row r and query head h (one query token per row, at position ctx_lens[r] - 1;
kv head = h // (heads / kv_heads)):
    K_r = tokens lo..ctx_lens[r]-1 of row r's blocks, read in place from the paged cache, where
          lo = 0, or max(0, ctx_lens[r] - window) when window > 0 (sliding window: positions > pos - window)
    out[r, h] = softmax(q[r, h] @ K_r[:, kv].T * scale) @ V_r[:, kv]
Shapes: q [rows, heads, head_dim]; k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim];
block_tables [rows, max_blocks] int64; ctx_lens [rows] int64; out [rows, heads, head_dim].

`cascade_decode_attention` computes the same result (window 0) for rows grouped by a shared
prefix: group g holds rows group_rows[group_starts[g]:group_starts[g+1]], whose block tables all
begin with the same group_blocks[g] blocks, each row's context reaching past them. The group's
queries attend those shared blocks in one pass (each K/V tile is read once for all the group's
rows and heads); every row then continues its own online softmax over the rest of its context
from that state (the log-sum-exp merge of the two passes). A row in no group runs the plain pass.

How: tokens go in tiles of 16 within a block; a tile's K and V are widened to fp32 once per
(job, KV head) and serve every query head of that KV head (and, in the shared pass, of every row
of the group). A query's 16 scores are 16 dot products whose horizontal sums are done together
as one transpose-and-add tree (AVX-512), then an online softmax update. With bf16 caches on CPUs
with AVX512-BF16 (head_dim 64 or 128) the pass instead takes its scores from the bf16 K rows with
bf16 dot products (exact products, fp32 sums), runs the softmax once per 256 tokens, and keeps up to
four heads' accumulators in registers while V streams by; it walks each row's blocks once per
softmax chunk for its K/V row pointers. On CPUs with AMX-BF16, a job of at least 16 queries (the
shared pass: a group's members x heads) runs on AMX tiles instead: scores transposed (K rows
times the packed queries, 16 tokens x 16 queries a tile), the softmax across each token's queries,
then P (rounded to bf16, as GPU flash attention does) times V in pairs of tokens into 16 x 16
accumulator tiles. A smaller job (a decode row's query heads of one KV head) takes the small-group
pass: the same score tiles but only nq columns wide, stored packed [tokens, nq], the softmax on
that packed layout, then P @ V in fp32 registers with P rounded to bf16 (the sum l from the
unrounded P), as torch's CPU flash attention (HF's SDPA, the parity oracle) does. `set_amx(False)`
turns both AMX passes off (tests compare them with the bf16 pass). Every pass prefetches the K and V
rows it reads next, as a row's blocks are scattered over the pool. Jobs go to the threads in
contiguous ranges of equal keys (keys x queries for chunks), not of equal count: rows come sorted by
context length, so a split by count gave the last thread most of the work. `decode_attention_ref`
and `cascade_decode_attention_ref` (kernels/cascade_attention.py) are the torch references.

`chunk_attention` (AMX CPUs, bf16, head_dim 64/128): causal attention of prefill chunks, written into
their rows of out. Semantics, per chunk c and query token i < q_lens[c] (row r = q_starts[c] + i,
position p = positions[c] + i, the chunk's K/V already in the cache):
    out[r] = decode_attention_ref(q[r], ..., block_tables[c], ctx = p + 1)
It runs the AMX pass on jobs of 32 query tokens x a KV head's query heads, each query masked to
tokens <= its position.
"""

from __future__ import annotations

import torch

from ._cpu_build import lazy_build

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

constexpr int64_t TILE = 16;        // tokens per tile
constexpr float NEG_BIG = -1e30f;   // "no key seen yet" (fast-math: no infinities)
constexpr int64_t SOFTMAX_CHUNK = 256;  // tokens per softmax step of the bf16 and AMX passes (below)
constexpr int64_t AMX_MIN_QUERIES = 16;  // a job takes the AMX pass (where it runs) from this many queries

#ifdef __AVX512F__
constexpr float LOG2E = 1.44269504f;

// 2^x for 16 lanes, x <= 0: the AMX pass's softmax, whose scale folds log2(e) in, which spares
// exp16's range reduction (10 instructions against 15; prefill chunks ran 4-8% faster, the shared
// pass 0-7%). x = n + f with n = round(x) and |f| <= 1/2 exact, 2^f by a degree-6 minimax
// polynomial (relative error ~1e-7, as exp16's), times 2^n (0 for very negative x, as for "no key
// seen yet"). The decode passes keep exp16: they wait on memory, and with 2^x one of the bf16
// parity prompts diverged at a three-ulp gap.
static inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5345811e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399931e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184891e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022646f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314718f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 horizontal sums at once (s[j] = sum of a[j]'s lanes): pairs interleaved, then 128-bit lanes folded.
static inline __m512 hsum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int p = 0; p < 8; ++p)
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  for (int p = 0; p < 4; ++p) {
    const __m512d x = _mm512_castps_pd(t[2 * p]), y = _mm512_castps_pd(t[2 * p + 1]);
    u[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 s0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 s1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s0, s1, 0x88), _mm512_shuffle_f32x4(s0, s1, 0xDD));
}
#endif

// s[j] = q . k[j] for the TILE rows of k ([TILE, d] fp32; rows past the tile's tokens are zeros).
template <int D>
static inline void scores_tile(const float* q, const float* k, int64_t d, float* s) {
#ifdef __AVX512F__
  if constexpr (D > 0 && D % 16 == 0) {
    __m512 qv[D / 16];
    for (int c = 0; c < D / 16; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    __m512 a[16];
    for (int j = 0; j < 16; ++j) {
      __m512 x = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k + j * D));
      for (int c = 1; c < D / 16; ++c) x = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + j * D + 16 * c), x);
      a[j] = x;
    }
    _mm512_storeu_ps(s, hsum16(a));
    return;
  }
#endif
  for (int64_t j = 0; j < TILE; ++j) s[j] = dot(q, k + j * d, d);
}


// Online softmax update of one query with a tile: scores s[0..n), values v [TILE, d] fp32.
// State: running max m, sum l, unnormalised accumulator acc [d].
template <int D>
static inline void softmax_tile(const float* s, int64_t n, const float* v, int64_t dd, float& m, float& l,
                                float* acc) {
  const int64_t d = D > 0 ? D : dd;
  float mt = NEG_BIG;
  for (int64_t j = 0; j < n; ++j) mt = std::max(mt, s[j]);
  const float m_new = std::max(m, mt);
  const float alpha = m_new > m ? std::exp(m - m_new) : 1.f;
  m = m_new;
#ifdef __AVX512F__
  if constexpr (D > 0 && D % 16 == 0) {
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 pv = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_loadu_ps(s), _mm512_set1_ps(m_new))));
    l = l * alpha + _mm512_reduce_add_ps(pv);
    alignas(64) float p[TILE];
    _mm512_store_ps(p, pv);
    __m512 a[D / 16];
    for (int c = 0; c < D / 16; ++c) a[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), _mm512_set1_ps(alpha));
    for (int64_t j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < D / 16; ++c) a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + j * D + 16 * c), a[c]);
    }
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
    return;
  }
#endif
  float p[TILE];
  for (int64_t j = 0; j < n; ++j) p[j] = std::exp(s[j] - m_new);
  l *= alpha;
  for (int64_t i = 0; i < d; ++i) acc[i] *= alpha;
  for (int64_t j = 0; j < n; ++j) {
    l += p[j];
    const float pj = p[j];
    const float* vj = v + j * d;
    for (int64_t i = 0; i < d; ++i) acc[i] += pj * vj[i];
  }
}

// Widens n token rows (tokens off..off+n-1 of one block, one KV head) to fp32 [TILE, d], zeros after.
template <typename T>
static inline void load_tile(const T* block, int64_t off, int64_t n, int64_t token_stride, int64_t d, float* dst) {
  for (int64_t j = 0; j < n; ++j) load_row(block + (off + j) * token_stride, dst + j * d, d);
  std::fill(dst + n * d, dst + TILE * d, 0.f);
}

struct Cache {
  const void* k;
  const void* v;
  const int64_t* tables;
  int64_t max_blocks, block_size, kv_heads, d;
};

// Offset (in elements) of token t's row of KV head kv in the K or V cache, through its block.
static inline int64_t token_offset(const Cache& c, const int64_t* table, int64_t kv, int64_t t) {
  return (table[t / c.block_size] * c.block_size + t % c.block_size) * c.kv_heads * c.d + kv * c.d;
}

// Blocks are scattered over the pool, so the hardware prefetcher cannot follow a row's context
// from one block to the next and a pass waits on DRAM latency: the passes ask ahead for the rows
// (of KV head kv, tokens t..t1-1) of `cache` (K or V) they will read next.
// Forced inline, so that the bf16 pass's compile-time row_bytes unrolls the inner loop: as an
// out-of-line call with a runtime size it made that pass 1.5x slower from DRAM.
template <typename T>
__attribute__((always_inline)) static inline void prefetch_rows(const T* cache, const Cache& c, const int64_t* table,
                                                                int64_t kv, int64_t t, int64_t t1, int64_t row_bytes) {
  for (; t < t1; ++t) {
    const char* row = reinterpret_cast<const char*>(cache + token_offset(c, table, kv, t));
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b);
  }
}

// Queries qf [nq, d] (scaled, fp32) of one KV head, each with its state (m, l, acc), attend tokens
// t0..t1-1 of block table `table` (K/V tiles loaded once for all nq queries).
template <typename T, int D>
static void attend_range(const Cache& c, const int64_t* table, int64_t kv, int64_t t0, int64_t t1, const float* qf,
                         int64_t nq, float* m, float* l, float* acc, float* kf, float* vf, float* s) {
  const int64_t d = D > 0 ? D : c.d, bs = c.block_size, token_stride = c.kv_heads * d;
  const T* kp = static_cast<const T*>(c.k);
  const T* vp = static_cast<const T*>(c.v);
  for (int64_t t = t0; t < t1;) {
    const int64_t off = t % bs, n = std::min({TILE, t1 - t, bs - off});
    const int64_t base = table[t / bs] * bs * token_stride + kv * d;
    const int64_t next_end = std::min(t + n + TILE, t1);  // the next tile's K and V
    prefetch_rows(kp, c, table, kv, t + n, next_end, d * static_cast<int64_t>(sizeof(T)));
    prefetch_rows(vp, c, table, kv, t + n, next_end, d * static_cast<int64_t>(sizeof(T)));
    load_tile(kp + base, off, n, token_stride, d, kf);
    load_tile(vp + base, off, n, token_stride, d, vf);
    for (int64_t i = 0; i < nq; ++i) {
      scores_tile<D>(qf + i * d, kf, d, s);
      softmax_tile<D>(s, n, vf, d, m[i], l[i], acc + i * d);
    }
    t += n;
  }
}

#if defined(__AVX512BF16__)
// The bf16 decode pass (AVX512-BF16): scores straight from the bf16 K rows with bf16 dot products
// (exact products, fp32 sums; no widening copy of K), softmax per chunk of up to SOFTMAX_CHUNK
// tokens rather than per tile (one max, one rescale of the accumulators per chunk), then P @ V in
// fp32 with the accumulators of up to HEADS_PER_PASS heads held in registers while V streams by.

// Row pointers of tokens t0..t0+n-1 (KV head kv) of a K or V cache, walked block by block: one
// table read per block and no division per token (a 64-bit division costs more than the token's math).
static inline void token_rows(const uint16_t* cache, const Cache& c, const int64_t* table, int64_t kv, int64_t t0,
                              int64_t n, const uint16_t** rows) {
  const int64_t bs = c.block_size, stride = c.kv_heads * c.d;
  int64_t b = t0 / bs, off = t0 % bs;
  const uint16_t* base = cache + table[b] * bs * stride + kv * c.d;
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = base + off * stride;
    if (++off == bs && j + 1 < n) {
      off = 0;
      base = cache + table[++b] * bs * stride + kv * c.d;
    }
  }
}

// Ask for tile j0..j0+nt-1's V rows (read by P @ V after the chunk's scores) and the next tile's K
// rows (krow holds `known` entries). Forced inline, as prefetch_rows (an out-of-line call slowed
// the pass from DRAM).
template <int D>
__attribute__((always_inline)) static inline void prefetch_tile(const uint16_t* const* krow,
                                                                const uint16_t* const* vrow, int64_t j0,
                                                                int64_t nt, int64_t known) {
  for (int64_t j = j0; j < j0 + nt; ++j)
    for (int b = 0; b < 2 * D; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(vrow[j]) + b);
  for (int64_t j = j0 + nt; j < std::min(j0 + nt + TILE, known); ++j)
    for (int b = 0; b < 2 * D; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(krow[j]) + b);
}

// The walk every bf16 pass (bf16, AMX, small-group) takes over tokens t0..t1-1 of `table` (KV head
// kv), SOFTMAX_CHUNK tokens at a time: per chunk, its K and V row pointers (krow also holds the next
// chunk's first tile, which the last tile's prefetch asks for); per tile of 16 tokens, once their
// rows are asked for, tile(krow + j0, j0, nt); then chunk_end(vrow, c0, n). Forced inline, as
// prefetch_tile, so each pass's lambdas compile into one loop.
template <int D, typename Tile, typename ChunkEnd>
__attribute__((always_inline)) static inline void walk_chunks(const Cache& c, const int64_t* table, int64_t kv,
                                                              int64_t t0, int64_t t1, const Tile& tile,
                                                              const ChunkEnd& chunk_end) {
  const uint16_t* kp = static_cast<const uint16_t*>(c.k);
  const uint16_t* vp = static_cast<const uint16_t*>(c.v);
  const uint16_t* krow[SOFTMAX_CHUNK + TILE];
  const uint16_t* vrow[SOFTMAX_CHUNK];
  for (int64_t c0 = t0; c0 < t1; c0 += SOFTMAX_CHUNK) {
    const int64_t n = std::min(SOFTMAX_CHUNK, t1 - c0);
    const int64_t known = std::min(SOFTMAX_CHUNK + TILE, t1 - c0);  // krow entries filled
    token_rows(kp, c, table, kv, c0, known, krow);
    token_rows(vp, c, table, kv, c0, n, vrow);
    for (int64_t j0 = 0; j0 < n; j0 += TILE) {
      const int64_t nt = std::min<int64_t>(TILE, n - j0);
      prefetch_tile<D>(krow, vrow, j0, nt, known);
      tile(krow + j0, j0, nt);
    }
    chunk_end(static_cast<const uint16_t* const*>(vrow), c0, n);
  }
}

// acc [nq, D] += P @ V for the chunk's n V rows, P's entry (query h, token j) at p[h * hs + j * ts]:
// up to HEADS_PER_PASS queries' accumulators in registers, each V row widened once per pass.
template <int D>
static inline void pv_accumulate(const uint16_t* const* vrow, int64_t n, const float* p, int64_t hs, int64_t ts,
                                 int64_t nq, float* acc) {
  constexpr int DV = D / 16;  // fp32 vectors per V row / accumulator
  constexpr int HEADS_PER_PASS = 16 / DV;
  for (int64_t h0 = 0; h0 < nq; h0 += HEADS_PER_PASS) {
    const int64_t nh = std::min<int64_t>(HEADS_PER_PASS, nq - h0);
    __m512 a[16];
    for (int64_t h = 0; h < nh; ++h)
      for (int x = 0; x < DV; ++x) a[h * DV + x] = _mm512_loadu_ps(acc + (h0 + h) * D + 16 * x);
    for (int64_t j = 0; j < n; ++j) {
      __m512 v[DV];
      for (int x = 0; x < DV; ++x) v[x] = bf16x16_load(reinterpret_cast<const at::BFloat16*>(vrow[j] + 16 * x));
      for (int64_t h = 0; h < nh; ++h) {
        const __m512 pj = _mm512_set1_ps(p[(h0 + h) * hs + j * ts]);
        for (int x = 0; x < DV; ++x) a[h * DV + x] = _mm512_fmadd_ps(pj, v[x], a[h * DV + x]);
      }
    }
    for (int64_t h = 0; h < nh; ++h)
      for (int x = 0; x < DV; ++x) _mm512_storeu_ps(acc + (h0 + h) * D + 16 * x, a[h * DV + x]);
  }
}

// The group's queries q [group, D] (bf16, unscaled) of KV head kv attend tokens t0..t1-1 of
// `table`, continuing the states m, l [group], acc [group, D]. sc: scratch [group, SOFTMAX_CHUNK].
template <int D>
static void attend_range_bf16(const Cache& c, const int64_t* table, int64_t kv, int64_t t0, int64_t t1,
                              const uint16_t* q, int64_t group, float scale, float* m, float* l, float* acc,
                              float* sc) {
  constexpr int KV = D / 32;  // bf16 vectors per K row
  // Scores: tiles of 16 tokens, 16 sums per tree.
  auto scores = [&](const uint16_t* const* krow, int64_t j0, int64_t nt) {
    for (int64_t h = 0; h < group; ++h) {
      __m512bh qv[KV];
      for (int x = 0; x < KV; ++x) qv[x] = (__m512bh)_mm512_loadu_si512(q + h * D + 32 * x);
      __m512 a[16];
      for (int64_t j = 0; j < 16; ++j) {
        if (j >= nt) { a[j] = _mm512_setzero_ps(); continue; }
        const uint16_t* kr = krow[j];
        __m512 x0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(kr));
        for (int x = 1; x < KV; ++x) x0 = _mm512_dpbf16_ps(x0, qv[x], (__m512bh)_mm512_loadu_si512(kr + 32 * x));
        a[j] = x0;
      }
      const __mmask16 valid = static_cast<__mmask16>((1u << nt) - 1u);
      _mm512_mask_storeu_ps(sc + h * SOFTMAX_CHUNK + j0, valid, _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
    }
  };
  // Softmax over the chunk, merged with the running state: p overwrites the scores; then P @ V.
  auto chunk_end = [&](const uint16_t* const* vrow, int64_t, int64_t n) {
    for (int64_t h = 0; h < group; ++h) {
      float* s = sc + h * SOFTMAX_CHUNK;
      __m512 mx = _mm512_set1_ps(NEG_BIG);
      for (int64_t j = 0; j < n; j += 16)
        mx = _mm512_mask_max_ps(mx, static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u), mx, _mm512_loadu_ps(s + j));
      const float m_new = std::max(m[h], _mm512_reduce_max_ps(mx));
      const float alpha = m_new > m[h] ? std::exp(m[h] - m_new) : 1.f;
      m[h] = m_new;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 valid = static_cast<__mmask16>(n - j >= 16 ? 0xFFFFu : (1u << (n - j)) - 1u);
        const __m512 pv = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, s + j), _mm512_set1_ps(m_new))));
        _mm512_mask_storeu_ps(s + j, valid, pv);
        sum = _mm512_add_ps(sum, pv);
      }
      l[h] = l[h] * alpha + _mm512_reduce_add_ps(sum);
      for (int64_t i = 0; i < D; ++i) acc[h * D + i] *= alpha;
    }
    pv_accumulate<D>(vrow, n, sc, SOFTMAX_CHUNK, 1, group, acc);
  };
  walk_chunks<D>(c, table, kv, t0, t1, scores, chunk_end);
}
#endif

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define BATCHGEN_AMX_ATTENTION 1
// The AMX pass (CPUs with AMX-BF16, groups of >= AMX_MIN_QUERIES queries: the shared-prefix pass):
// the scores come transposed, S^T [16 tokens, 16 queries] = K rows (A tiles, read straight from the
// block: 16 token rows, 32 bf16 each, one row stride apart) times the queries (B tiles, packed once
// per job), 16 x 16 x 32 products per tile instruction. The softmax then runs across each token's
// 16 queries (a vector per token: no horizontal sums), and P @ V runs on tiles too.
static bool amx_enabled = true;  // set_amx(false): the bf16 pass everywhere (tests compare the two)

// Tiles (configure_tiles, the shared prelude's amx_ready decides). Scores: 0 = S^T (fp32 16 x 16),
// 1 and 6 = query tiles in turn, 2..5 = the K tile's 32-column slices. P @ V: 0..3 = accumulators,
// 4 = P, 5 and 6 = V pairs in turn.

// (a0, b0, a1, b1, ...): the 16-bit lanes of [a (16) | b (16)] interleaved, as VNNI pairs.
static inline __m512i pair_index() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

// x[i] lane j <- x[j] lane i (32-bit lanes): 4x4 transposes within 128-bit lanes, then the lanes.
static inline void transpose16x16(__m512i* x) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    x[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    x[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    x[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    x[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(x[i], x[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(x[i], x[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(x[i + 8], x[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(x[i + 8], x[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    x[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    x[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    x[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// Queries q [nq, D] (bf16) as B tiles: qb[qt][x][dp][qq][e] = q[16 qt + qq][32 x + 2 dp + e], zero
// past nq: per tile and 32 dims, the 16 queries' dword pairs transposed.
template <int D>
static void pack_queries(const uint16_t* q, int64_t nq, uint16_t* qb) {
  constexpr int KX = D / 32;
  for (int64_t qt = 0; qt < (nq + 15) / 16; ++qt)
    for (int x = 0; x < KX; ++x) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = 16 * qt + i < nq ? _mm512_loadu_si512(q + (16 * qt + i) * D + 32 * x) : _mm512_setzero_si512();
      transpose16x16(r);
      for (int64_t dp = 0; dp < 16; ++dp) _mm512_storeu_si512(qb + ((qt * KX + x) * 16 + dp) * 32, r[dp]);
    }
}

// The K rows of tokens krow[0..nt) as AMX A tiles' source: in place (lda = the cache's row stride)
// when they are 16 consecutive rows of one block, else copied into kbuf [16, D] (zeros past nt).
template <int D>
static inline const uint16_t* k_tile(const uint16_t* const* krow, int64_t nt, int64_t stride, uint16_t* kbuf,
                                     int64_t& lda) {
  if (nt == 16 && krow[15] == krow[0] + 15 * stride) {
    lda = 2 * stride;
    return krow[0];
  }
  for (int64_t j = 0; j < 16; ++j) {
    if (j < nt) std::copy(krow[j], krow[j] + D, kbuf + j * D);
    else std::fill(kbuf + j * D, kbuf + (j + 1) * D, 0);
  }
  lda = 2 * D;
  return kbuf;
}

// The small-group pass's tiles (below): 0 = S^T [16 tokens, nq] (fp32), 1, 4, 5, 6 = the query
// tiles (32 dims and nq queries each), 2 and 3 = K tiles in turn.
static void configure_small_tiles(int64_t nq) {
  struct alignas(64) { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg = {};
  cfg.palette = 1;
  for (int t : {0, 1, 4, 5, 6}) { cfg.colsb[t] = static_cast<uint16_t>(4 * nq); cfg.rows[t] = 16; }
  for (int t : {2, 3}) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}

// Loads the tile configuration for score tiles `cols` fp32 columns wide (16: configure_tiles' layout,
// every tile 16 x 64 bytes; fewer: configure_small_tiles') unless it is the one in place. `current`
// is the caller's record for this thread's run of jobs (0 at its start: none), so a run loads one
// only when the pass changes; a load cost ~0.4 us a job. Nothing else on the thread touches the tiles
// within a run (the linear kernels release theirs, which resets the configuration, between calls).
static inline void use_tiles(int64_t cols, int64_t& current) {
  if (current == cols) return;
  if (cols == 16) configure_tiles();
  else configure_small_tiles(cols);
  current = cols;
}

// As attend_range_bf16, for queries packed by pack_queries (qb), nq >= 1, P rounded to bf16 for
// P @ V (as GPU flash attention does). Scratch: st [ceil(nq / 16), SOFTMAX_CHUNK, 16] (the chunk's
// S^T, then P^T); kbuf [16, D] (a tile's K rows when they are not 16 consecutive rows of one block);
// accp [ceil(nq / 16) * 16, D] (the accumulators, padded to whole tiles); vb [SOFTMAX_CHUNK / 32,
// D / 16, 16, 32] (V's token pairs); pa [SOFTMAX_CHUNK / 32, 16, 32] (one query tile's P).
template <int D>
static void attend_range_amx(const Cache& c, const int64_t* table, int64_t kv, int64_t t0, int64_t t1,
                             const uint16_t* qb, int64_t nq, float scale, float* m, float* l, float* acc, float* st,
                             uint16_t* kbuf, float* accp, uint16_t* vb, uint16_t* pa, int64_t& tile_cols,
                             const int32_t* qpos = nullptr) {
  constexpr int KX = D / 32;  // A tiles per K row
  constexpr int DV = D / 16;  // fp32 vectors per V row / accumulator; output tiles per query tile
  static_assert(KX == 2 || KX == 4, "head_dim 64 or 128");
  const int64_t qtiles = (nq + 15) / 16, stride = c.kv_heads * c.d;
  std::copy(acc, acc + nq * D, accp);
  std::fill(accp + nq * D, accp + qtiles * 16 * D, 0.f);
  use_tiles(16, tile_cols);
  auto scores = [&](const uint16_t* const* krow, int64_t j0, int64_t nt) {
    int64_t lda;  // bytes between the tile's token rows
    const uint16_t* a = k_tile<D>(krow, nt, stride, kbuf, lda);
    _tile_loadd(2, a, lda);
    _tile_loadd(3, a + 32, lda);
    if constexpr (KX == 4) {
      _tile_loadd(4, a + 64, lda);
      _tile_loadd(5, a + 96, lda);
    }
    for (int64_t qt = 0; qt < qtiles; ++qt) {
      const uint16_t* b = qb + qt * KX * 512;
      _tile_zero(0);
      _tile_loadd(1, b, 64);
      _tile_loadd(6, b + 512, 64);
      _tile_dpbf16ps(0, 2, 1);
      _tile_dpbf16ps(0, 3, 6);
      if constexpr (KX == 4) {
        _tile_loadd(1, b + 1024, 64);
        _tile_loadd(6, b + 1536, 64);
        _tile_dpbf16ps(0, 4, 1);
        _tile_dpbf16ps(0, 5, 6);
      }
      _tile_stored(0, st + (qt * SOFTMAX_CHUNK + j0) * 16, 64);
    }
  };
  auto chunk_end = [&](const uint16_t* const* vrow, int64_t c0, int64_t n) {
    // Softmax across each token's queries, merged with the running state: P^T overwrites S^T.
    for (int64_t qt = 0; qt < qtiles; ++qt) {
      float* s = st + qt * SOFTMAX_CHUNK * 16;
      const int64_t q0 = 16 * qt, nv = std::min<int64_t>(16, nq - q0);
      const __mmask16 valid = static_cast<__mmask16>(nv == 16 ? 0xFFFFu : (1u << nv) - 1u);
      // Causal (qpos given): query lane i sees token t only where t <= qpos[q0 + i].
      const __m512i pos = qpos ? _mm512_mask_loadu_epi32(_mm512_set1_epi32(INT32_MAX), valid, qpos + q0)
                               : _mm512_set1_epi32(INT32_MAX);
      auto sees = [&](int64_t j) {
        if (!qpos) return valid;
        return static_cast<__mmask16>(valid & _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32(static_cast<int32_t>(c0 + j))));
      };
      __m512 mxs[4] = {_mm512_set1_ps(NEG_BIG), _mm512_set1_ps(NEG_BIG), _mm512_set1_ps(NEG_BIG),
                       _mm512_set1_ps(NEG_BIG)};  // four chains: a max waits on the one before
      for (int64_t j = 0; j < n; ++j) mxs[j % 4] = _mm512_mask_max_ps(mxs[j % 4], sees(j), mxs[j % 4], _mm512_loadu_ps(s + 16 * j));
      const __m512 mx = _mm512_max_ps(_mm512_max_ps(mxs[0], mxs[1]), _mm512_max_ps(mxs[2], mxs[3]));
      const __m512 vscale = _mm512_set1_ps(scale);
      const __m512 m_old = _mm512_mask_loadu_ps(_mm512_set1_ps(NEG_BIG), valid, m + q0);
      const __m512 m_new = _mm512_max_ps(m_old, _mm512_mul_ps(mx, vscale));
      const __m512 log2e = _mm512_set1_ps(LOG2E);
      const __m512 alpha = exp2_16(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), log2e));  // 1 where the max did not move
      // p = e^(s scale - m_new) = 2^(s scale log2(e) - m_new log2(e))
      const __m512 vscale2 = _mm512_set1_ps(scale * LOG2E), m_new2 = _mm512_mul_ps(m_new, log2e);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m512 p = _mm512_maskz_mov_ps(sees(j), exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * j), vscale2, m_new2)));
        _mm512_storeu_ps(s + 16 * j, p);
        sum = _mm512_add_ps(sum, p);
      }
      const __m512 l_old = _mm512_maskz_loadu_ps(valid, l + q0);
      _mm512_mask_storeu_ps(m + q0, valid, m_new);
      _mm512_mask_storeu_ps(l + q0, valid, _mm512_fmadd_ps(l_old, alpha, sum));
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      for (int64_t h = 0; h < nv; ++h) {
        const __m512 ah = _mm512_set1_ps(al[h]);
        for (int x = 0; x < DV; ++x)
          _mm512_storeu_ps(accp + (q0 + h) * D + 16 * x, _mm512_mul_ps(ah, _mm512_loadu_ps(accp + (q0 + h) * D + 16 * x)));
      }
    }
    // P @ V on tiles: O [16 queries, 16 dims] += P [16 queries, 32 tokens] (bf16) x V in pairs of
    // tokens (B tiles, built once per chunk for every query tile), into each query's accumulator row.
    const int64_t steps = (n + 31) / 32;
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t tp = 0; tp < 16; ++tp) {
        const int64_t t = 32 * s + 2 * tp;
        for (int dt = 0; dt < DV; ++dt) {
          const __m256i r0 = t < n ? _mm256_loadu_si256((const __m256i*)(vrow[t] + 16 * dt)) : _mm256_setzero_si256();
          const __m256i r1 = t + 1 < n ? _mm256_loadu_si256((const __m256i*)(vrow[t + 1] + 16 * dt)) : _mm256_setzero_si256();
          const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1);
          _mm512_storeu_si512(vb + ((s * DV + dt) * 16 + tp) * 32, _mm512_permutexvar_epi16(pair_index(), x));
        }
      }
    for (int64_t qt = 0; qt < qtiles; ++qt) {
      const float* pt = st + qt * SOFTMAX_CHUNK * 16;  // P^T [tokens, 16 queries]
      for (int64_t s = 0; s < steps; ++s) {  // A tiles: P^T's token pairs as dwords, transposed
        __m512i x[16];
        for (int64_t tp = 0; tp < 16; ++tp) {
          const int64_t t = 32 * s + 2 * tp;
          const __m512 p0 = t < n ? _mm512_loadu_ps(pt + 16 * t) : _mm512_setzero_ps();
          const __m512 p1 = t + 1 < n ? _mm512_loadu_ps(pt + 16 * (t + 1)) : _mm512_setzero_ps();
          x[tp] = _mm512_permutexvar_epi16(pair_index(), (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        }
        transpose16x16(x);
        for (int64_t r = 0; r < 16; ++r) _mm512_storeu_si512(pa + (s * 16 + r) * 32, x[r]);
      }
      float* o = accp + qt * 16 * D;  // [16 queries, D]
      for (int dg = 0; dg < DV; dg += 4) {  // 4 accumulator tiles at a time
        _tile_loadd(0, o + 16 * dg, 4 * D);
        _tile_loadd(1, o + 16 * (dg + 1), 4 * D);
        _tile_loadd(2, o + 16 * (dg + 2), 4 * D);
        _tile_loadd(3, o + 16 * (dg + 3), 4 * D);
        for (int64_t s = 0; s < steps; ++s) {
          const uint16_t* b = vb + (s * DV + dg) * 512;
          _tile_loadd(4, pa + s * 512, 64);
          _tile_loadd(5, b, 64);
          _tile_loadd(6, b + 512, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_dpbf16ps(1, 4, 6);
          _tile_loadd(5, b + 1024, 64);
          _tile_loadd(6, b + 1536, 64);
          _tile_dpbf16ps(2, 4, 5);
          _tile_dpbf16ps(3, 4, 6);
        }
        _tile_stored(0, o + 16 * dg, 4 * D);
        _tile_stored(1, o + 16 * (dg + 1), 4 * D);
        _tile_stored(2, o + 16 * (dg + 2), 4 * D);
        _tile_stored(3, o + 16 * (dg + 3), 4 * D);
      }
    }
  };
  walk_chunks<D>(c, table, kv, t0, t1, scores, chunk_end);
  std::copy(accp, accp + nq * D, acc);
}

// The small-group pass (AMX CPUs, fewer than AMX_MIN_QUERIES queries: a decode row's query heads of
// one KV head). The scores come from AMX tiles as in the AMX pass, but only nq columns wide and
// stored packed, S^T [tokens, nq]: the bf16 pass spent most of its time on 16 dot products per
// tile and their transpose-and-add trees. The softmax then runs on that packed layout (below) and
// P @ V in fp32 registers as in the bf16 pass, but with P rounded to bf16 and l summed from the
// unrounded P, as torch's CPU flash attention does: HF's SDPA, which greedy parity is held against
// (with P kept in fp32, one of the bf16 parity prompts diverged at a three-ulp gap).

// Softmax over a chunk of n tokens' scores s [n, nq] (unscaled), merged with the running state
// (m, l [nq], acc [nq, D]): p = exp(s * scale - m_new), rounded to bf16, overwrites s; l sums the
// unrounded p. Entry e of s belongs to query e % nq, so vectors k and k + nq of s (16 entries each)
// hold the same queries lane for lane: nq running maxima (then sums), one per k mod nq, cover every
// query without a transpose.
template <int D>
static void softmax_packed(float* s, int64_t n, int64_t nq, float scale, float* m, float* l, float* acc) {
  const int64_t total = n * nq, vecs = (total + 15) / 16;
  auto lanes = [&](int64_t k) {
    return static_cast<__mmask16>(total - 16 * k >= 16 ? 0xFFFFu : (1u << (total - 16 * k)) - 1u);
  };
  alignas(64) float lane[16 * 16];  // per k mod nq: 16 lanes of maxima, then of sums
  alignas(64) float m_lane[16 * 16];  // per k mod nq: each lane's query's new maximum
  float mx[16], alpha[16];
  for (int64_t a = 0; a < nq; ++a) {
    __m512 x = _mm512_set1_ps(NEG_BIG);
    for (int64_t k = a; k < vecs; k += nq) x = _mm512_mask_max_ps(x, lanes(k), x, _mm512_loadu_ps(s + 16 * k));
    _mm512_store_ps(lane + 16 * a, x);
  }
  std::fill(mx, mx + nq, NEG_BIG);
  for (int64_t e = 0, h = 0; e < 16 * nq; ++e, h = h + 1 == nq ? 0 : h + 1) mx[h] = std::max(mx[h], lane[e]);
  for (int64_t h = 0; h < nq; ++h) {
    const float m_new = std::max(m[h], mx[h] * scale);
    alpha[h] = m_new > m[h] ? std::exp(m[h] - m_new) : 1.f;
    m[h] = m_new;
  }
  for (int64_t e = 0, h = 0; e < 16 * nq; ++e, h = h + 1 == nq ? 0 : h + 1) m_lane[e] = m[h];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t a = 0; a < nq; ++a) {
    const __m512 mv = _mm512_load_ps(m_lane + 16 * a);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = a; k < vecs; k += nq) {
      const __mmask16 valid = lanes(k);
      const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(valid, s + 16 * k), vscale, mv)));
      _mm512_mask_storeu_ps(s + 16 * k, valid, bf16x16_round(p));
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_store_ps(lane + 16 * a, sum);
  }
  float sums[16] = {};
  for (int64_t e = 0, h = 0; e < 16 * nq; ++e, h = h + 1 == nq ? 0 : h + 1) sums[h] += lane[e];
  for (int64_t h = 0; h < nq; ++h) {
    l[h] = l[h] * alpha[h] + sums[h];
    const __m512 ah = _mm512_set1_ps(alpha[h]);
    for (int x = 0; x < D / 16; ++x)
      _mm512_storeu_ps(acc + h * D + 16 * x, _mm512_mul_ps(ah, _mm512_loadu_ps(acc + h * D + 16 * x)));
  }
}

// As attend_range_bf16, for 1 <= nq < 16 queries packed by pack_queries (qb). Scratch: st
// [SOFTMAX_CHUNK, nq] (the chunk's scores, then P); kbuf [16, D] (as in the AMX pass).
template <int D>
static void attend_range_amx_small(const Cache& c, const int64_t* table, int64_t kv, int64_t t0, int64_t t1,
                                   const uint16_t* qb, int64_t nq, float scale, float* m, float* l, float* acc,
                                   float* st, uint16_t* kbuf, int64_t& tile_cols) {
  constexpr int KX = D / 32;  // K tiles (32 dims each) per token row
  static_assert(KX == 2 || KX == 4, "head_dim 64 or 128");
  const int64_t stride = c.kv_heads * c.d;
  use_tiles(nq, tile_cols);
  _tile_loadd(1, qb, 64);  // the queries stay in their tiles for the whole range
  _tile_loadd(4, qb + 512, 64);
  if constexpr (KX == 4) {
    _tile_loadd(5, qb + 1024, 64);
    _tile_loadd(6, qb + 1536, 64);
  }
  auto scores = [&](const uint16_t* const* krow, int64_t j0, int64_t nt) {
    int64_t lda;  // bytes between the tile's token rows
    const uint16_t* a = k_tile<D>(krow, nt, stride, kbuf, lda);
    _tile_zero(0);
    _tile_loadd(2, a, lda);
    _tile_loadd(3, a + 32, lda);
    _tile_dpbf16ps(0, 2, 1);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (KX == 4) {
      _tile_loadd(2, a + 64, lda);
      _tile_loadd(3, a + 96, lda);
      _tile_dpbf16ps(0, 2, 5);
      _tile_dpbf16ps(0, 3, 6);
    }
    _tile_stored(0, st + j0 * nq, 4 * nq);  // rows past nt (zeros) land past n, unread
  };
  auto chunk_end = [&](const uint16_t* const* vrow, int64_t, int64_t n) {
    softmax_packed<D>(st, n, nq, scale, m, l, acc);
    pv_accumulate<D>(vrow, n, st, 1, nq, nq, acc);
  };
  walk_chunks<D>(c, table, kv, t0, t1, scores, chunk_end);
}
#endif

// f(begin, end) over jobs [0, n) in one contiguous range per thread, the ranges of equal total cost
// (cost(j): job j's share of the work, e.g. its keys; plus one for its fixed work). at::parallel_for splits by count,
// and jobs are far from equal: decode rows come sorted by context length, and a chunk's later query
// tiles see more keys, so the last thread got most of the work while the first one waited.
template <typename Cost, typename F>
static void parallel_jobs(int64_t n, const Cost& cost, const F& f) {
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  if (parts <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  std::vector<double> cum(n + 1, 0.0);
  for (int64_t j = 0; j < n; ++j) cum[j + 1] = cum[j] + static_cast<double>(cost(j)) + 1.0;
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  for (int64_t p = 1; p < parts; ++p)  // the first job whose cumulative cost passes p / parts of the total
    bounds[p] = std::lower_bound(cum.begin(), cum.end(), cum[n] * p / parts) - cum.begin();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (bounds[p] < bounds[p + 1]) f(bounds[p], bounds[p + 1]);
  });
}

// One thread's scratch for `attend` over up to nq queries of head_dim d. The AMX pass's own buffers
// (accumulators, V pairs, P tiles) are sized only where a job can take it (nq >= AMX_MIN_QUERIES):
// a decode call's per-thread scratch stays small.
struct Scratch {
  std::vector<float> qf, kf, vf, s, sc;
  std::vector<float> st, accp;           // the AMX passes' scores / P, the AMX pass's accumulators
  std::vector<uint16_t> qb, kb, vb, pa;  // packed queries, gathered K rows; the AMX pass's V pairs and P tiles
  int64_t tile_cols = 0;  // the AMX passes' tile configuration in place (use_tiles), 0: none
  Scratch(int64_t nq, int64_t d)
      : qf(nq * d), kf(TILE * d), vf(TILE * d), s(TILE), sc(nq * SOFTMAX_CHUNK),
        st((nq + 15) / 16 * 16 * SOFTMAX_CHUNK), qb((nq + 15) / 16 * std::max<int64_t>(d / 32, 1) * 512),
        kb(TILE * d) {
    if (nq < AMX_MIN_QUERIES) return;
    accp.resize((nq + 15) / 16 * 16 * d);
    vb.resize(SOFTMAX_CHUNK * d);
    pa.resize(SOFTMAX_CHUNK * 16);
  }
};

// Queries q [nq, d] (as stored in the cache's dtype, unscaled) of KV head kv, each with its state
// (m, l, acc), attend tokens t0..t1-1 of `table`: the bf16 pass where it applies, else the fp32
// tile pass on the widened, scaled queries.
template <typename T, int D>
static void attend(const Cache& c, const int64_t* table, int64_t kv, int64_t t0, int64_t t1, const T* q, int64_t nq,
                   float scale, float* m, float* l, float* acc, Scratch& w) {
#if defined(BATCHGEN_AMX_ATTENTION)
  if constexpr (std::is_same_v<T, at::BFloat16> && (D == 64 || D == 128)) {
    if (amx_enabled && amx_ready()) {
      pack_queries<D>(reinterpret_cast<const uint16_t*>(q), nq, w.qb.data());
      if (nq >= AMX_MIN_QUERIES) {
        attend_range_amx<D>(c, table, kv, t0, t1, w.qb.data(), nq, scale, m, l, acc, w.st.data(), w.kb.data(),
                            w.accp.data(), w.vb.data(), w.pa.data(), w.tile_cols);
      } else {
        attend_range_amx_small<D>(c, table, kv, t0, t1, w.qb.data(), nq, scale, m, l, acc, w.st.data(),
                                  w.kb.data(), w.tile_cols);
      }
      return;
    }
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && (D == 64 || D == 128)) {
    attend_range_bf16<D>(c, table, kv, t0, t1, reinterpret_cast<const uint16_t*>(q), nq, scale, m, l, acc,
                         w.sc.data());
    return;
  }
#endif
  const int64_t d = D > 0 ? D : c.d;
  load_row(q, w.qf.data(), nq * d);
  for (int64_t i = 0; i < nq * d; ++i) w.qf[i] *= scale;
  attend_range<T, D>(c, table, kv, t0, t1, w.qf.data(), nq, m, l, acc, w.kf.data(), w.vf.data(), w.s.data());
}

// Every row: its KV heads' queries over tokens [start, ctx) (start = starts[r] or the window's
// first), from the state in init [rows, heads, d + 2] (m, l, acc) where starts[r] > 0.
template <typename T, int D>
static void decode_rows(const torch::Tensor& q, const Cache& c, const int64_t* lens, double scale, int64_t window,
                        const int64_t* starts, const float* init, torch::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), d = D > 0 ? D : c.d, group = heads / c.kv_heads;
  const int64_t sq = q.stride(0);  // a row's heads are contiguous; rows may be strided (views of a fused qkv)
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto keys = [&](int64_t job) {
    const int64_t r = job / c.kv_heads;
    return lens[r] - (starts != nullptr ? starts[r] : 0);
  };
  parallel_jobs(rows * c.kv_heads, keys, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * d), m(group), l(group);
    Scratch w(group, d);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / c.kv_heads, kv = job % c.kv_heads, h0 = kv * group, ctx = lens[r];
      int64_t t0 = 0;
      if (starts != nullptr && starts[r] > 0) {
        t0 = starts[r];
        for (int64_t g = 0; g < group; ++g) {
          const float* st = init + (r * heads + h0 + g) * (d + 2);
          m[g] = st[0]; l[g] = st[1];
          std::copy(st + 2, st + 2 + d, acc.data() + g * d);
        }
      } else {
        std::fill(m.begin(), m.end(), NEG_BIG);
        std::fill(l.begin(), l.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
      }
      if (window > 0) t0 = std::max(t0, ctx - window);
      attend<T, D>(c, c.tables + r * c.max_blocks, kv, t0, ctx, qp + r * sq + h0 * d, group,
                   static_cast<float>(scale), m.data(), l.data(), acc.data(), w);
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / l[g];
        for (int64_t i = 0; i < d; ++i) acc[g * d + i] *= inv;
      }
      store_row(acc.data(), op + (r * heads + h0) * d, group * d);
    }
  });
}

// The shared pass: each (group, KV head, chunk of up to 32 member rows) attends the group's shared
// blocks and leaves every member head's state in state [rows, heads, d + 2].
template <typename T, int D>
static void shared_pass(const torch::Tensor& q, const Cache& c, double scale, const int64_t* group_rows,
                        const int64_t* group_starts, const int64_t* group_blocks, int64_t num_groups,
                        float* state) {
  constexpr int64_t CHUNK = 32;
  const int64_t heads = q.size(1), d = D > 0 ? D : c.d, group = heads / c.kv_heads, sq = q.stride(0);
  const T* qp = q.data_ptr<T>();
  std::vector<int64_t> jobs;  // (group, first member) pairs, flattened
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t i = group_starts[g]; i < group_starts[g + 1]; i += CHUNK) { jobs.push_back(g); jobs.push_back(i); }
  const int64_t num_jobs = static_cast<int64_t>(jobs.size() / 2);
  // A job's time goes mostly to reading the shared K/V (its queries share each load)
  auto keys = [&](int64_t job) { return group_blocks[jobs[2 * (job / c.kv_heads)]] * c.block_size; };
  parallel_jobs(num_jobs * c.kv_heads, keys, [&](int64_t begin, int64_t end) {
    std::vector<T> qg(CHUNK * group * d);  // the members' queries of this KV head, side by side
    std::vector<float> acc(CHUNK * group * d), m(CHUNK * group), l(CHUNK * group);
    Scratch w(CHUNK * group, d);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t g = jobs[2 * (job / c.kv_heads)], first = jobs[2 * (job / c.kv_heads) + 1];
      const int64_t kv = job % c.kv_heads, h0 = kv * group;
      const int64_t n_rows = std::min(CHUNK, group_starts[g + 1] - first), nq = n_rows * group;
      for (int64_t i = 0; i < n_rows; ++i) {
        const T* src = qp + group_rows[first + i] * sq + h0 * d;
        std::copy(src, src + group * d, qg.data() + i * group * d);
      }
      std::fill(m.begin(), m.begin() + nq, NEG_BIG);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      std::fill(acc.begin(), acc.begin() + nq * d, 0.f);
      const int64_t* table = c.tables + group_rows[group_starts[g]] * c.max_blocks;
      attend<T, D>(c, table, kv, 0, group_blocks[g] * c.block_size, qg.data(), nq, static_cast<float>(scale),
                   m.data(), l.data(), acc.data(), w);
      for (int64_t i = 0; i < n_rows; ++i)
        for (int64_t gh = 0; gh < group; ++gh) {
          float* st = state + (group_rows[first + i] * heads + h0 + gh) * (d + 2);
          const int64_t qi = i * group + gh;
          st[0] = m[qi]; st[1] = l[qi];
          std::copy(acc.data() + qi * d, acc.data() + (qi + 1) * d, st + 2);
        }
    }
  });
}

static Cache make_cache(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& tables) {
  return Cache{k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr<int64_t>(), tables.size(1),
               k_cache.size(1), k_cache.size(2), k_cache.size(3)};
}

// q [rows, heads, d]: each row's heads contiguous, any row stride (a view of the fused qkv projection).
static void check_inputs(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: each row's heads must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), "one dtype");
}

#define DISPATCH_HEAD_DIM(NAME, ...)                                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), NAME, [&] {      \
    switch (q.size(2)) {                                                                      \
      case 64: { constexpr int D = 64; __VA_ARGS__; break; }                                  \
      case 128: { constexpr int D = 128; __VA_ARGS__; break; }                                \
      default: { constexpr int D = 0; __VA_ARGS__; }                                          \
    }                                                                                         \
  })

// Whether the AMX pass may run (it runs where this CPU and build have AMX-BF16 tiles); returns
// whether it can run here.
bool set_amx(bool enabled) {
#if defined(BATCHGEN_AMX_ATTENTION)
  amx_enabled = enabled;
  return amx_ready();
#else
  return false;
#endif
}

#if defined(BATCHGEN_AMX_ATTENTION)
// Prefill chunks, causal, on AMX tiles: a job is (chunk, up to CHUNK_TOKENS of its query tokens, KV
// head), its queries those tokens x the KV head's query heads, attending tokens 0 .. its last
// position, each query masked to tokens <= its own position. Writes the chunks' rows of out.
template <int D>
static void chunk_rows(const torch::Tensor& q, const Cache& c, const int64_t* q_starts, const int64_t* q_lens,
                       const int64_t* pos0, int64_t num_chunks, double scale, torch::Tensor& out) {
  constexpr int64_t CHUNK_TOKENS = 32;
  const int64_t heads = q.size(1), group = heads / c.kv_heads, sq = q.stride(0), so = out.stride(0);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  std::vector<int64_t> jobs;  // (chunk, first query token) pairs, flattened
  for (int64_t ch = 0; ch < num_chunks; ++ch)
    for (int64_t i0 = 0; i0 < q_lens[ch]; i0 += CHUNK_TOKENS) { jobs.push_back(ch); jobs.push_back(i0); }
  const int64_t num_jobs = static_cast<int64_t>(jobs.size() / 2);
  auto keys_x_queries = [&](int64_t job) {
    const int64_t ch = jobs[2 * (job / c.kv_heads)], i0 = jobs[2 * (job / c.kv_heads) + 1];
    const int64_t ntok = std::min(CHUNK_TOKENS, q_lens[ch] - i0);
    return (pos0[ch] + i0 + ntok) * ntok;
  };
  parallel_jobs(num_jobs * c.kv_heads, keys_x_queries, [&](int64_t begin, int64_t end) {
    const int64_t max_q = CHUNK_TOKENS * group;
    std::vector<uint16_t> qg(max_q * D);
    std::vector<float> acc(max_q * D), m(max_q), l(max_q);
    std::vector<int32_t> qpos(max_q);
    Scratch w(max_q, D);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t ch = jobs[2 * (job / c.kv_heads)], i0 = jobs[2 * (job / c.kv_heads) + 1];
      const int64_t kv = job % c.kv_heads, h0 = kv * group;
      const int64_t ntok = std::min(CHUNK_TOKENS, q_lens[ch] - i0), nq = ntok * group;
      for (int64_t i = 0; i < ntok; ++i) {
        const uint16_t* src = qp + (q_starts[ch] + i0 + i) * sq + h0 * D;
        std::copy(src, src + group * D, qg.data() + i * group * D);
        for (int64_t gh = 0; gh < group; ++gh) qpos[i * group + gh] = static_cast<int32_t>(pos0[ch] + i0 + i);
      }
      std::fill(m.begin(), m.begin() + nq, NEG_BIG);
      std::fill(l.begin(), l.begin() + nq, 0.f);
      std::fill(acc.begin(), acc.begin() + nq * D, 0.f);
      pack_queries<D>(qg.data(), nq, w.qb.data());
      attend_range_amx<D>(c, c.tables + ch * c.max_blocks, kv, 0, pos0[ch] + i0 + ntok, w.qb.data(), nq,
                          static_cast<float>(scale), m.data(), l.data(), acc.data(), w.st.data(), w.kb.data(),
                          w.accp.data(), w.vb.data(), w.pa.data(), w.tile_cols, qpos.data());
      for (int64_t qi = 0; qi < nq; ++qi) {
        const float inv = 1.f / l[qi];
        for (int64_t x = 0; x < D; ++x) acc[qi * D + x] *= inv;
      }
      for (int64_t i = 0; i < ntok; ++i)
        store_row(acc.data() + i * group * D, op + (q_starts[ch] + i0 + i) * so + h0 * D, group * D);
    }
  });
}
#endif

bool amx_available() {
#if defined(BATCHGEN_AMX_ATTENTION)
  return amx_enabled && amx_ready();
#else
  return false;
#endif
}

// Causal attention of prefill chunks into their rows of out (see chunk_attention in Python).
void chunk_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                     torch::Tensor q_starts, torch::Tensor q_lens, torch::Tensor positions, double scale,
                     torch::Tensor out) {
  check_inputs(q, k_cache, v_cache);
  TORCH_CHECK(amx_available() && q.scalar_type() == at::kBFloat16 && (q.size(2) == 64 || q.size(2) == 128),
              "chunk_attention needs AMX-BF16 tiles, bf16 and head_dim 64 or 128");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes() && out.stride(2) == 1 &&
              out.stride(1) == q.size(2), "out: [tokens, heads, head_dim], each row's heads contiguous");
#if defined(BATCHGEN_AMX_ATTENTION)
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto starts = q_starts.to(torch::kInt64).contiguous();
  auto lens = q_lens.to(torch::kInt64).contiguous();
  auto pos = positions.to(torch::kInt64).contiguous();
  const Cache c = make_cache(k_cache, v_cache, tables);
  if (q.size(2) == 64)
    chunk_rows<64>(q, c, starts.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), lens.size(0), scale, out);
  else
    chunk_rows<128>(q, c, starts.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), lens.size(0), scale, out);
#endif
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t window) {
  check_inputs(q, k_cache, v_cache);
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = ctx_lens.to(torch::kInt64).contiguous();
  const Cache c = make_cache(k_cache, v_cache, tables);
  DISPATCH_HEAD_DIM("decode_attention",
                    decode_rows<scalar_t, D>(q, c, lens.data_ptr<int64_t>(), scale, window, nullptr, nullptr, out));
  return out;
}

torch::Tensor cascade_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                       torch::Tensor block_tables, torch::Tensor ctx_lens, double scale,
                                       torch::Tensor group_rows, torch::Tensor group_starts,
                                       torch::Tensor group_blocks) {
  check_inputs(q, k_cache, v_cache);
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = ctx_lens.to(torch::kInt64).contiguous();
  auto grows = group_rows.to(torch::kInt64).contiguous();
  auto gstarts = group_starts.to(torch::kInt64).contiguous();
  auto gblocks = group_blocks.to(torch::kInt64).contiguous();
  const int64_t rows = q.size(0), num_groups = gblocks.size(0), bs = k_cache.size(1);
  TORCH_CHECK(gstarts.size(0) == num_groups + 1, "group_starts must have num_groups + 1 entries");
  // Where each row's own pass begins (0: no group) and the shared pass's state per (row, head).
  auto starts = torch::zeros({rows}, torch::kInt64);
  int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* gr = grows.data_ptr<int64_t>();
  const int64_t* gs = gstarts.data_ptr<int64_t>();
  const int64_t* gb = gblocks.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  for (int64_t g = 0; g < num_groups; ++g)
    for (int64_t i = gs[g]; i < gs[g + 1]; ++i) {
      TORCH_CHECK(gr[i] >= 0 && gr[i] < rows && st[gr[i]] == 0, "group_rows: a row out of range or in two groups");
      TORCH_CHECK(gb[g] > 0 && gb[g] * bs < ln[gr[i]], "group_blocks: a row's context must reach past its shared blocks");
      st[gr[i]] = gb[g] * bs;
    }
  auto state = torch::empty({rows, q.size(1), q.size(2) + 2}, torch::kFloat32);
  const Cache c = make_cache(k_cache, v_cache, tables);
  DISPATCH_HEAD_DIM("cascade_decode_attention", {
    shared_pass<scalar_t, D>(q, c, scale, gr, gs, gb, num_groups, state.data_ptr<float>());
    decode_rows<scalar_t, D>(q, c, ln, scale, 0, st, state.data_ptr<float>(), out);
  });
  return out;
}

std::unordered_map<std::string, int64_t> entry_points() {  // for kernels/cpu_decoder.py
  return {ENTRY_POINT(decode_attention), ENTRY_POINT(cascade_decode_attention)};
}
"""

load = lazy_build("batchgen_cpu_decode_attention_v5", _SOURCE,
                  ["decode_attention", "cascade_decode_attention", "chunk_attention", "amx_available", "set_amx",
                   "entry_points"])


def amx_available() -> bool:
    """Whether the AMX passes run here (built, AMX-BF16 tiles granted, not switched off by set_amx)."""
    module = load()
    return module is not None and bool(module.amx_available())


def chunk_attention(q, k_cache, v_cache, block_tables, q_starts, q_lens, positions, scale: float,
                    out: torch.Tensor) -> None:
    """Causal attention of prefill chunks on AMX tiles (bf16, head_dim 64 or 128, amx_available()),
    written into their rows of out [tokens, heads, d]. Chunk c's queries are q[q_starts[c] :
    q_starts[c] + q_lens[c]], at positions positions[c] ..; each attends tokens 0 .. its own
    position of block_tables[c] (its own K/V already in the cache). As decode_attention_ref with one
    row per query token (ctx = position + 1, the chunk's table)."""
    load().chunk_attention(heads_contiguous(q), k_cache, v_cache, block_tables, q_starts, q_lens, positions, scale,
                           out)


def heads_contiguous(q: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, d] as the kernels take it: each row's heads contiguous, any row stride (a view
    of the fused q/k/v projection passes as it is)."""
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, window: int = 0) -> torch.Tensor:
    return load().decode_attention(heads_contiguous(q), k_cache, v_cache, block_tables, ctx_lens, scale, int(window))


def decode_attention_ref(q, k_cache, v_cache, block_tables, ctx_lens, scale: float, window: int = 0) -> torch.Tensor:
    rows, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for r in range(rows):
        ctx = int(ctx_lens[r])
        lo = max(0, ctx - window) if window > 0 else 0
        blocks = block_tables[r, :-(-ctx // block_size)]
        k = k_cache[blocks].reshape(-1, kv_heads, d)[lo:ctx].float()  # [ctx - lo, kv_heads, d]
        v = v_cache[blocks].reshape(-1, kv_heads, d)[lo:ctx].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # [ctx - lo, heads, d]
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        p = torch.einsum("hd,thd->ht", q[r].float() * scale, k).softmax(-1)
        out[r] = torch.einsum("ht,thd->hd", p, v).to(q.dtype)
    return out
