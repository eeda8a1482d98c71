"""Builds batchgen's C++ CPU kernels on first use (torch's load_inline; cached under
~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), or reports that they cannot be built here so
callers fall back to torch.

The first build takes about 25 s on 2 cores; it is announced once per process (logger "batchgen",
at warning level so that it shows without any logging set up), with where the result is cached.
`make install` builds them ahead (`python -m batchgen.kernels.build`), so that a first run does not wait.
`BATCHGEN_CPU_KERNELS=0` turns every C++ kernel off (the torch paths then run everywhere).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import platform
import time

logger = logging.getLogger("batchgen")

# C++ shared by the kernels' sources (prepended to them).
ROW_CONVERSIONS = r"""
#include <torch/extension.h>
#include <cstdint>
#include <unordered_map>

// One entry of an extension's `entry_points()`: a C++ kernel's name and address, for C++ callers
// in other extensions (kernels/cpu_decoder.py runs a decode step's layers in one call): a direct
// call skips the Python round trip between kernels.
#define ENTRY_POINT(f) {#f, reinterpret_cast<int64_t>(&f)}

// Row conversions to and from fp32 scratch. For bf16 they are bit operations (widen = shift, narrow
// = round to nearest even) written so the compiler vectorizes them; c10's scalar casts do not.
template <typename T> static inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T> static inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <> inline void load_row<at::BFloat16>(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
template <> inline void store_row<at::BFloat16>(const float* src, at::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    d[i] = nan ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
// Four dot products a_k . b_k of length n at once. One accumulator is a chain of dependent FMAs
// (latency-bound, ~4 cycles each); four independent chains keep the FMA units busy.
static inline void dot4(const float* a0, const float* a1, const float* a2, const float* a3, const float* b0,
                        const float* b1, const float* b2, const float* b3, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s0 += a0[i] * b0[i];
    s1 += a1[i] * b1[i];
    s2 += a2[i] * b2[i];
    s3 += a3[i] * b3[i];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}
static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
// Rounds x to T's precision and back, in place (a no-op for fp32).
template <typename T> static inline void round_row(float* x, T* tmp, int64_t n) {
  store_row(x, tmp, n);
  load_row(tmp, x, n);
}
#ifdef __AVX512F__
#include <immintrin.h>
// exp(x) for 16 lanes, x clamped to [-87, 89]: x = n ln2 + r with n = round(x / ln2) and r reduced
// in two steps (Cody-Waite: ln2 split into a short high part and a low part, so r keeps its bits for
// large |x|), e^r by its degree-7 Taylor polynomial on |r| <= ln2 / 2, times 2^n. About 1 ulp, as expf.
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(89.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define BF16X16 1  // the bf16 lane helpers below
// 16 bf16 values (bits) widened to fp32 lanes.
static inline __m512 bf16x16_widen(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
// Up to 16 bf16 values (n < 16: the first n, the rest read as 0) widened to fp32 lanes.
// Full vectors take plain loads and stores; masks only for a row's tail.
static inline __m512 bf16x16_load(const at::BFloat16* src, int64_t n = 16) {
  return bf16x16_widen(n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                               : _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), src));
}
// fp32 lanes -> bf16 bits, rounded as store_row rounds (to nearest even; NaN -> 0x7fc0).
static inline __m256i bf16x16_bits(__m512 x) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // The CPU's own rounding (two uops, against ten): the same bits except for NaNs (it keeps their
  // sign and payload) and denormals (it flushes them to zero), which take the integer path below.
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0xA1 /* QNaN | SNaN | denormal */) == 0, 1))
    return (__m256i)_mm512_cvtneps_pbh(x);
#endif
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
static inline void bf16x16_store_bits(at::BFloat16* dst, __m256i bits, int64_t n = 16) {
  if (n >= 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bits);
  else _mm256_mask_storeu_epi16(dst, __mmask16((1u << n) - 1), bits);
}
static inline void bf16x16_store(at::BFloat16* dst, __m512 x, int64_t n = 16) {
  bf16x16_store_bits(dst, bf16x16_bits(x), n);
}
// x rounded to bf16 and widened back: what a store and a reload give.
static inline __m512 bf16x16_round(__m512 x) { return bf16x16_widen(bf16x16_bits(x)); }
#endif
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
// Linux hands out AMX tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM).
[[maybe_unused]] static bool amx_ready() {
  static const bool ready = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
    return tile && bf16 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ready;
}
// All eight tiles 16 rows x 64 bytes, the one shape batchgen's AMX kernels use (per thread: call it
// before a thread's first tile instruction).
[[maybe_unused]] static void configure_tiles() {
  struct alignas(64) { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
}
#endif
"""

@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ("" where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them, or None where /proc/cpuinfo can't say."""
    line = next((line for line in cpuinfo().splitlines() if line.startswith("flags")), None)
    return None if line is None else set(line.split(":", 1)[1].split())


_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    _FLAGS.append("-mprefer-vector-width=512")  # 512-bit vectors on AVX-512 parts (GCC defaults to 256)


def build(name: str, source: str, functions: list[str]):
    """The compiled module, or None when C++ kernels are off or cannot be built (no compiler, no headers)."""
    if os.environ.get("BATCHGEN_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        compiling = _announce(name)
        start = time.perf_counter()
        with _build_lock(build_directory(name)):
            module = load_inline(name=name, cpp_sources=[source], functions=functions, extra_cflags=_FLAGS,
                                 extra_ldflags=["-fopenmp"], verbose=False)
        if compiling:
            logger.info("C++ CPU kernel %s ready (%.0f s)", name, time.perf_counter() - start)
        return module
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        logger.warning("C++ CPU kernels %s unavailable (%s); using the torch path", name, str(e).splitlines()[0])
        return None


@contextlib.contextmanager
def _build_lock(directory: str | None):
    """Serializes batchgen's builds of one extension with a lock the kernel drops when its holder dies.

    torch guards a build with a `lock` file that its builder removes when done; a builder killed
    mid-build (a job cancelled, a session ended) leaves it behind and every later load waits on it
    forever. Under this flock no other batchgen process is building the extension, so a `lock` file
    found now is such a leftover: it is removed, and torch builds (or loads) as usual.
    """
    if directory is None:  # torch cannot say where it builds: nothing to guard
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "batchgen.flock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = os.path.join(directory, "lock")
        if os.path.exists(stale):
            logger.warning("removing a build lock left by a killed build: %s", stale)
            os.remove(stale)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


_announced = False


def build_directory(name: str) -> str | None:
    """Where torch caches extension `name` (None when torch cannot say)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return _get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001 - a private torch helper: its absence only costs the message
        return None


def _announce(name: str) -> bool:
    """Say once per process that the kernels are being compiled (no built module in the cache yet)."""
    global _announced
    directory = build_directory(name)
    if directory is not None and os.path.exists(os.path.join(directory, f"{name}.so")):
        return False  # built before: torch only rebuilds when the source changed
    if not _announced:
        _announced = True
        where = os.path.dirname(directory) if directory else "torch's extension cache"
        logger.warning("compiling batchgen's C++ CPU kernels (first use only, about 25 s on 2 cores; cached in "
                       "%s; `python -m batchgen.kernels.build` builds them ahead, BATCHGEN_CPU_KERNELS=0 skips them)", where)
    return True


def lazy_build(name: str, source: str, functions: list[str]):
    """`load()` for one extension (ROW_CONVERSIONS + source): builds it on the first call, then
    returns the same module, or None when it cannot be built (callers fall back to torch)."""
    return functools.cache(lambda: build(name, ROW_CONVERSIONS + source, functions))
