#pragma once
/// @file Matrix products with few rows, for decoding on the CPU. A decoding step multiplies a handful of rows
/// (one per sequence) by every weight matrix, so its speed is the speed of reading the weights. OpenBLAS's sgemm
/// packs the whole right-hand matrix before multiplying, which at one to four rows reads and writes each weight
/// several times (a 768 x 2304 product at one row: 0.20 ms with sgemm against 0.05 ms for one pass), and the tied
/// vocabulary projection (hidden x wte^T, wte [V, D]) is slower still: 12-18 ms for 50257 x 768 at 1-16 rows, where
/// one pass over the 154 MB table takes 4.4 ms. These kernels read each weight once per call, threaded over the
/// output columns on the OpenMP runtime LibTorch itself uses:
///
/// - small_rows_addmm(bias, x, w): y = x w + bias with w [K, N] (Conv1D's layout), for at most 64 rows with
///   AVX-512 (decoding at batch 64, prefill of short prompts) and 8 with AVX2 only (beyond, OpenBLAS's packed
///   kernels win against 8-wide vectors);
/// - small_rows_mm_nt(x, e): y = x e^T with e [N, K] (the vocabulary projection), for at most 32 rows.
///
/// In fp32 each has an AVX-512 and an AVX2 + FMA version; the best the CPU has runs, capped by set_decode_isa().
/// Both return an undefined tensor (and the caller uses torch's operator) unless: the CPU has AVX2 and FMA, every
/// tensor is fp32, dense and on the CPU, no autograd graph is needed (inference mode or no_grad, or nothing
/// requires a gradient), autocast is off, and the decode kernels are enabled (set_decode_kernels(); on by default).
/// Results equal torch's up to float summation order (~1e-6 relative).
///
/// Products torch computes in bf16 (under bf16 autocast, or with bf16 operands) take AVX512-BF16 kernels instead,
/// at any number of rows, while a DecodePackScope is open (generate() opens one): each weight is packed once per
/// scope into bf16 pairs, and the result is the fp32 sum rounded to bf16, as torch's. oneDNN's bf16 products in
/// LibTorch 1.13 are slow at few rows on CPUs without AMX (Zen 5, GPT-2 small: 11-39 ms for the vocabulary
/// projection at 1-32 rows against 1.9-4.1 ms here, 0.3-0.5 ms for a 768 x 2304 layer against 0.03-0.14 ms) and
/// these kernels keep up with it at 512-4096 rows.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>

#include <dlfcn.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/precision.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Instruction sets of the decode kernels, in increasing order. avx512_bf16 (AVX-512 with AVX512-BF16, BW and VL)
/// adds the bf16 kernels to the AVX-512 ones.
enum class DecodeIsa { none, avx2, avx512, avx512_bf16 };

namespace detail {

inline std::atomic<DecodeIsa>& decode_isa_cap() {
  static std::atomic<DecodeIsa> cap{DecodeIsa::avx512_bf16};
  return cap;
}

/// The best instruction set of this CPU for the kernels (AVX2 counts only with FMA).
inline DecodeIsa cpu_decode_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const DecodeIsa isa =
      !__builtin_cpu_supports("avx512f")
          ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? DecodeIsa::avx2 : DecodeIsa::none)
      : __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512vl")
          ? DecodeIsa::avx512_bf16
          : DecodeIsa::avx512;
  return isa;
#else
  return DecodeIsa::none;
#endif
}

}  // namespace detail

/// Caps the instruction set of the few-row decode kernels for the whole process (DecodeIsa::avx512_bf16, the
/// default, lets the CPU's best run; DecodeIsa::avx512 keeps the fp32 kernels and leaves bf16 products to torch;
/// DecodeIsa::none turns the kernels off). For benchmarks and tests that compare the versions.
inline void set_decode_isa(DecodeIsa cap) { detail::decode_isa_cap() = cap; }

/// The instruction set the decode kernels run with: the CPU's best, capped by set_decode_isa().
inline DecodeIsa decode_isa() { return std::min(detail::cpu_decode_isa(), detail::decode_isa_cap().load()); }

/// Turns the few-row decode kernels on (the CPU's best instruction set) or off for the whole process (on by
/// default); off, every product goes through torch's addmm / matmul. For benchmarks that show what the kernels save.
inline void set_decode_kernels(bool on) { set_decode_isa(on ? DecodeIsa::avx512_bf16 : DecodeIsa::none); }

/// Whether the few-row decode kernels are switched on (they also need AVX2 and FMA to run).
inline bool decode_kernels_enabled() { return detail::decode_isa_cap() != DecodeIsa::none; }

/// Rows up to which small_rows_addmm takes a product with the kernels' present instruction set (beyond, sgemm's
/// packing pays for itself); 0 when the kernels do not run.
inline int64_t small_rows_addmm_max_rows() {
  switch (decode_isa()) {
    case DecodeIsa::avx512_bf16:
    case DecodeIsa::avx512: return 64;
    case DecodeIsa::avx2: return 8;
    default: return 0;
  }
}

/// Rows up to which small_rows_mm_nt takes a product.
inline constexpr int64_t kSmallRowsMmNt = 32;

namespace detail {
/// Columns per panel of the weights packed for the decode kernels (pack_fp32_panels, pack_bf16_pairs).
inline constexpr int64_t kDecodePanel = 48;
}  // namespace detail

namespace detail {

/// Runs `f(thread, threads)` on up to `threads` threads of libgomp, the OpenMP runtime LibTorch's CPU build uses
/// (found at run time: GOMP_parallel is what `#pragma omp parallel` compiles to), so the work runs on torch's own
/// worker threads instead of competing with them for the cores. On the calling thread alone when `threads` is 1,
/// the runtime is not loaded, or the caller is already inside a parallel region. The first exception is rethrown.
template <class F>
void omp_parallel(int threads, F&& f) {
  using Parallel = void (*)(void (*)(void*), void*, unsigned, unsigned);
  using Query = int (*)();
  static const auto parallel = reinterpret_cast<Parallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  static const auto thread_num = reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  static const auto num_threads = reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
  static const auto in_parallel = reinterpret_cast<Query>(dlsym(RTLD_DEFAULT, "omp_in_parallel"));
  if (threads <= 1 || !parallel || !thread_num || !num_threads || !in_parallel || in_parallel()) return f(0, 1);
  struct Context {
    F* f;
    Query thread_num, num_threads;
    std::mutex mutex;
    std::exception_ptr error;
  } context{&f, thread_num, num_threads, {}, {}};
  parallel(
      [](void* data) {
        auto* c = static_cast<Context*>(data);
        try {
          (*c->f)(c->thread_num(), c->num_threads());
        } catch (...) {
          std::lock_guard<std::mutex> lock(c->mutex);
          if (!c->error) c->error = std::current_exception();
        }
      },
      &context, static_cast<unsigned>(threads), 0);
  if (context.error) std::rethrow_exception(context.error);
}

/// The share [begin, end) of `count` items (in units of `grain`) of thread `thread` of `threads`.
inline std::pair<int64_t, int64_t> thread_share(int64_t count, int64_t grain, int thread, int threads) {
  const int64_t units = (count + grain - 1) / grain;
  const int64_t begin = units * thread / threads * grain, end = units * (thread + 1) / threads * grain;
  return {std::min(begin, count), std::min(end, count)};
}

#if defined(__GNUC__) && defined(__x86_64__)

// The tiles index their accumulators with loop counters bound by template parameters; unrolled, the accumulators
// live in registers whatever the optimisation level (GCC's -O2 keeps such loops and spills every accumulator).
#define RLHF_UNROLL _Pragma("GCC unroll 16")

/// Sum of the eight lanes.
__attribute__((target("avx2,fma"))) inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// y[r, n0 .. n0 + 16) = bias + x[r, :] w[:, n0 .. n0 + 16) for R rows: 2 x R accumulators, one 64-byte row segment
/// of w per k (one cache line when w is 64-byte aligned and N a multiple of 16).
template <int R>
__attribute__((target("avx2,fma"))) inline void addmm_tile(const float* x, int64_t k, const float* w, int64_t n,
                                                           const float* bias, float* y, int64_t n0) {
  __m256 acc[R][2];
  RLHF_UNROLL for (int r = 0; r < R; ++r) {
    acc[r][0] = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    acc[r][1] = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
  }
  const float* wk = w + n0;
  for (int64_t kk = 0; kk < k; ++kk, wk += n) {
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * k + kk);
      acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  RLHF_UNROLL for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * n + n0, acc[r][0]);
    _mm256_storeu_ps(y + r * n + n0 + 8, acc[r][1]);
  }
}

/// y [m, n] = bias + x [m, k] w [k, n] for columns [c0, c1) (c0 a multiple of 16): per 16-column strip of w, tiles
/// of up to 6 rows (12 accumulators + 2 weight vectors + 1 broadcast of the 16 registers); the strip is read from
/// memory by the first tile and from L2 by the others.
__attribute__((target("avx2,fma"))) inline void addmm_columns(const float* x, int64_t m, int64_t k, const float* w,
                                                              int64_t n, const float* bias, float* y, int64_t c0,
                                                              int64_t c1) {
  int64_t n0 = c0;
  for (; n0 + 16 <= c1; n0 += 16) {
    for (int64_t r = 0; r < m; r += 6) {
      const float* xr = x + r * k;
      float* yr = y + r * n;
      switch (std::min<int64_t>(m - r, 6)) {
        case 1: addmm_tile<1>(xr, k, w, n, bias, yr, n0); break;
        case 2: addmm_tile<2>(xr, k, w, n, bias, yr, n0); break;
        case 3: addmm_tile<3>(xr, k, w, n, bias, yr, n0); break;
        case 4: addmm_tile<4>(xr, k, w, n, bias, yr, n0); break;
        case 5: addmm_tile<5>(xr, k, w, n, bias, yr, n0); break;
        default: addmm_tile<6>(xr, k, w, n, bias, yr, n0); break;
      }
    }
  }
  for (; n0 < c1; ++n0)  // the last N % 16 columns
    for (int64_t r = 0; r < m; ++r) {
      float sum = bias ? bias[n0] : 0.0f;
      for (int64_t kk = 0; kk < k; ++kk) sum += x[r * k + kk] * w[kk * n + n0];
      y[r * n + n0] = sum;
    }
}

/// y[r, n0 + j] = x[r, :] . e[n0 + j, :] for R rows of x and J rows of e: R x J accumulators over k in steps of 8.
template <int R, int J>
__attribute__((target("avx2,fma"))) inline void dot_tile(const float* x, int64_t k, const float* e, float* y,
                                                         int64_t n, int64_t n0) {
  __m256 acc[R][J];
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* rows[J];
  RLHF_UNROLL for (int j = 0; j < J; ++j) rows[j] = e + (n0 + j) * k;
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    __m256 ej[J];
    RLHF_UNROLL for (int j = 0; j < J; ++j) ej[j] = _mm256_loadu_ps(rows[j] + kk);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_loadu_ps(x + r * k + kk);
      RLHF_UNROLL for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int j = 0; j < J; ++j) {
      float sum = sum_lanes(acc[r][j]);
      for (int64_t t = kk; t < k; ++t) sum += x[r * k + t] * rows[j][t];
      y[r * n + n0 + j] = sum;
    }
}

/// y [m, n] = x [m, k] e^T for rows [c0, c1) of e [n, k]: four rows of e at a time (read once from memory, then
/// from L1 for every pair of rows of x).
__attribute__((target("avx2,fma"))) inline void mm_nt_columns(const float* x, int64_t m, int64_t k, const float* e,
                                                              int64_t n, float* y, int64_t c0, int64_t c1) {
  int64_t n0 = c0;
  for (; n0 + 4 <= c1; n0 += 4) {
    int64_t r = 0;
    for (; r + 2 <= m; r += 2) dot_tile<2, 4>(x + r * k, k, e, y + r * n, n, n0);
    if (r < m) dot_tile<1, 4>(x + r * k, k, e, y + r * n, n, n0);
  }
  for (; n0 < c1; ++n0)
    for (int64_t r = 0; r < m; ++r) dot_tile<1, 1>(x + r * k, k, e, y + r * n, n, n0);
}

// AVX-512 versions. A register holds 16 floats, and there are 32 registers, so an addmm tile is up to 8 rows x 48
// columns (24 accumulators, 3 weight vectors, 1 broadcast): at 9-64 rows the row tiles take turns on a strip of w
// that the first read from memory and the others read from L2, and no packed copy of w is ever written, which is
// where sgemm loses at these shapes (the 48 products of GPT-2-small's layers at 16 rows: 22.5 ms against sgemm's
// 35 ms; at 64 rows 60 against 74-80). Column and k tails go through masked loads and stores. A strip's last tile
// prefetches the next strip into L2 as it goes, so memory is read while the tiles compute (Zen 5, the 48 products at
// 16 rows: 16-20 -> 12-14 ms; at 8 rows 13-16 -> 9-14).

/// All lanes below `count` (at most 16).
inline __mmask16 lanes_below(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
}

/// 16 floats from `p`, or with `masked` only the lanes of `mask` (the others 0, their memory not read).
__attribute__((target("avx512f"))) inline __m512 load512(const float* p, bool masked, __mmask16 mask) {
  return masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
}

/// y[r, n0 .. n0 + cols) = bias + x[r, :] w[:, n0 .. n0 + cols) for R rows, with C vectors of 16 columns, where
/// `strip` points at w[0, n0] and row kk of the strip starts `ldw` floats after row kk - 1 (w's row stride N in
/// place, 48 in a packed panel); `prefetch`, when set, is the next strip in the same layout. With Tail, the last
/// vector is masked to `cols` (the other loads and stores stay unmasked).
template <int R, int C, bool Tail>
__attribute__((target("avx512f"))) inline void addmm_tile512(const float* x, int64_t k, const float* strip,
                                                             int64_t ldw, int64_t n, const float* bias, float* y,
                                                             int64_t n0, int64_t cols, const float* prefetch) {
  const __mmask16 last = Tail ? lanes_below(cols - 16 * (C - 1)) : __mmask16(0xFFFF);
  __m512 acc[R][C];
  RLHF_UNROLL for (int c = 0; c < C; ++c) {
    const __m512 b = bias ? load512(bias + n0 + 16 * c, Tail && c == C - 1, last) : _mm512_setzero_ps();
    RLHF_UNROLL for (int r = 0; r < R; ++r) acc[r][c] = b;
  }
  const float* wk = strip;
  for (int64_t kk = 0; kk < k; ++kk, wk += ldw) {
    if (R >= 4 && ldw == kDecodePanel && kk + 16 < k) {  // a panel's row 16 ahead into L1 (see AddmmStrips512)
      const char* ahead = reinterpret_cast<const char*>(wk + 16 * kDecodePanel);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
    }
    if (prefetch) {  // the next strip's row kk into L2, while this tile computes
      const char* next = reinterpret_cast<const char*>(prefetch + kk * ldw);
      _mm_prefetch(next, _MM_HINT_T1);
      _mm_prefetch(next + 64, _MM_HINT_T1);
      _mm_prefetch(next + 128, _MM_HINT_T1);
    }
    __m512 wv[C];
    RLHF_UNROLL for (int c = 0; c < C; ++c) wv[c] = load512(wk + 16 * c, Tail && c == C - 1, last);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + kk]);
      RLHF_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xr, wv[c], acc[r][c]);
    }
  }
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int c = 0; c < C; ++c) {
      float* out = y + r * n + n0 + 16 * c;
      if (Tail && c == C - 1)
        _mm512_mask_storeu_ps(out, last, acc[r][c]);
      else
        _mm512_storeu_ps(out, acc[r][c]);
    }
}

/// A tile of R rows: 48 full columns, or the strip's last 1-47 columns.
template <int R>
__attribute__((target("avx512f"))) inline void addmm_strip512(const float* x, int64_t k, const float* strip,
                                                              int64_t ldw, int64_t n, const float* bias, float* y,
                                                              int64_t n0, int64_t cols, const float* prefetch) {
  if (cols == 48) return addmm_tile512<R, 3, false>(x, k, strip, ldw, n, bias, y, n0, cols, prefetch);
  if (cols > 32) return addmm_tile512<R, 3, true>(x, k, strip, ldw, n, bias, y, n0, cols, prefetch);
  if (cols > 16) return addmm_tile512<R, 2, true>(x, k, strip, ldw, n, bias, y, n0, cols, prefetch);
  addmm_tile512<R, 1, true>(x, k, strip, ldw, n, bias, y, n0, cols, prefetch);
}

/// Calls `strip.template run<R>(r, n0, cols, next)` for every tile of R rows starting at row r, on strips of 48
/// columns [n0, n0 + cols) of [c0, c1): each strip in row tiles of at most 8 rows of near-equal size (16 rows: 8 + 8;
/// 12 rows: 6 + 6). `next` is the next strip's first column for a strip's last tile (which may fetch it meanwhile),
/// -1 otherwise.
template <class Strip>
inline void tile_strips(int64_t m, int64_t c0, int64_t c1, const Strip& strip) {
  const int64_t tiles = (m + 7) / 8;
  for (int64_t n0 = c0; n0 < c1; n0 += 48) {
    const int64_t cols = std::min<int64_t>(48, c1 - n0);
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int64_t rows = m / tiles + (t < m % tiles ? 1 : 0);
      const int64_t next = t == tiles - 1 && n0 + 48 < c1 ? n0 + 48 : -1;
      switch (rows) {
        case 1: strip.template run<1>(r, n0, cols, next); break;
        case 2: strip.template run<2>(r, n0, cols, next); break;
        case 3: strip.template run<3>(r, n0, cols, next); break;
        case 4: strip.template run<4>(r, n0, cols, next); break;
        case 5: strip.template run<5>(r, n0, cols, next); break;
        case 6: strip.template run<6>(r, n0, cols, next); break;
        case 7: strip.template run<7>(r, n0, cols, next); break;
        default: strip.template run<8>(r, n0, cols, next); break;
      }
      r += rows;
    }
  }
}

/// y [m, n] = bias + x [m, k] w [k, n] for the columns tile_strips() hands out; w in its own [K, N] layout, or
/// with `panels` as pack_fp32_panels() lays it out. In place, a strip's last tile prefetches the next strip into L2
/// (its rows lie a row of w apart, too far for the hardware prefetchers); a panel is one contiguous block, which
/// the hardware prefetchers stream on their own, and tiles of 4 or more rows (whose loads the FMAs space out)
/// fetch 16 rows ahead into L1 (at one row it cost 10-20%, at 16 rows it saved 10%). Zen 5, GPT-2 small's 48 layer
/// products in fp32, ms in place -> in panels: 1 row 7.3-8.9 -> 4.6-6.8, 8 rows 8.8-10.1 -> 5.7-6.9, 16 rows
/// 12.0-14.5 -> 9.0-10.0 (docs/performance.md).
struct AddmmStrips512 {
  const float* x;
  int64_t k;
  const float* w;
  int64_t n;
  const float* bias;
  float* y;
  bool panels = false;
  /// Where the strip of columns n0 .. n0 + 48 starts.
  const float* strip(int64_t n0) const { return panels ? w + n0 / kDecodePanel * k * kDecodePanel : w + n0; }
  template <int R>
  __attribute__((target("avx512f"))) void run(int64_t r, int64_t n0, int64_t cols, int64_t next) const {
    addmm_strip512<R>(x + r * k, k, strip(n0), panels ? kDecodePanel : n, n, bias, y + r * n, n0, cols,
                      next >= 0 && !panels ? strip(next) : nullptr);
  }
};

/// Sum of the sixteen lanes. (The zero-masked forms of the shuffles: GCC 12's unmasked ones start from an
/// "undefined" vector that -Wuninitialized reports.)
__attribute__((target("avx512f"))) inline float sum_lanes512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0x4E));  // + the other 256-bit half
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0xB1));  // + the neighbouring 128-bit lane
  __m128 s = _mm512_maskz_extractf32x4_ps(0xF, v, 0);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// y[r, n0 + j] = x[r, :] . e[n0 + j, :] for R rows of x and J rows of e: R x J accumulators over k in steps of 16
/// (the last step masked).
template <int R, int J>
__attribute__((target("avx512f"))) inline void dot_tile512(const float* x, int64_t k, const float* e, float* y,
                                                           int64_t n, int64_t n0) {
  __m512 acc[R][J];
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* rows[J];
  RLHF_UNROLL for (int j = 0; j < J; ++j) rows[j] = e + (n0 + j) * k;
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    __m512 ej[J];
    RLHF_UNROLL for (int j = 0; j < J; ++j) ej[j] = _mm512_loadu_ps(rows[j] + kk);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_loadu_ps(x + r * k + kk);
      RLHF_UNROLL for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  if (kk < k) {
    const __mmask16 mask = lanes_below(k - kk);
    __m512 ej[J];
    RLHF_UNROLL for (int j = 0; j < J; ++j) ej[j] = _mm512_maskz_loadu_ps(mask, rows[j] + kk);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_maskz_loadu_ps(mask, x + r * k + kk);
      RLHF_UNROLL for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int j = 0; j < J; ++j) y[r * n + n0 + j] = sum_lanes512(acc[r][j]);
}

/// dot_tile512 over all rows of x: tiles of 4 rows, then the last 1-3.
template <int J>
__attribute__((target("avx512f"))) inline void dot_rows512(const float* x, int64_t m, int64_t k, const float* e,
                                                           float* y, int64_t n, int64_t n0) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) dot_tile512<4, J>(x + r * k, k, e, y + r * n, n, n0);
  switch (m - r) {
    case 3: dot_tile512<3, J>(x + r * k, k, e, y + r * n, n, n0); break;
    case 2: dot_tile512<2, J>(x + r * k, k, e, y + r * n, n, n0); break;
    case 1: dot_tile512<1, J>(x + r * k, k, e, y + r * n, n, n0); break;
    default: break;
  }
}

/// y [m, n] = x [m, k] e^T for rows [c0, c1) of e [n, k]: six rows of e at a time (read once from memory, then
/// from L1 for every tile of rows of x).
__attribute__((target("avx512f"))) inline void mm_nt_columns512(const float* x, int64_t m, int64_t k, const float* e,
                                                                int64_t n, float* y, int64_t c0, int64_t c1) {
  int64_t n0 = c0;
  for (; n0 + 6 <= c1; n0 += 6) dot_rows512<6>(x, m, k, e, y, n, n0);
  for (; n0 < c1; ++n0) dot_rows512<1>(x, m, k, e, y, n, n0);
}

// bf16 versions (AVX512-BF16). vdpbf16ps multiplies bf16 pairs and adds both products to one fp32 lane, so the
// weights are packed once (DecodePackScope, pack_bf16_pairs) into pairs along k, in panels of 48 columns: panel p
// holds, for every pair i of k, columns 48p .. 48p + 48 of rows 2i and 2i + 1 interleaved. A tile's strip of w is
// then one contiguous block read front to back (in w's own [K, N] layout consecutive k lie N x 4 bytes apart, a
// page or more at GPT-2's widths, where hardware prefetchers stop). Each row's pair of x is broadcast; tiles as
// addmm_tile512 (up to 8 rows x 48 columns) at half the k steps and half the bytes of w. The sums are fp32 and the
// output is rounded to bf16 (to nearest even), as torch's bf16 addmm does.

#define RLHF_BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))

/// y[r, n0 .. n0 + cols) = bf16(bias + x[r, :] w[:, n0 .. n0 + cols)) for R rows, x as bf16 pairs [R, kp] and w as
/// the panel of columns n0 .. n0 + 48 ([kp, 48] pairs, zero past the matrix's columns), with C vectors of 16
/// columns; with Tail, the last vector's bias and output are masked to `cols`. Meanwhile `lines` cache lines from
/// `ahead` on are requested into L2, spread evenly over the loop.
template <int R, int C, bool Tail>
RLHF_BF16_TARGET inline void bf16_tile(const int32_t* x, int64_t kp, const int32_t* panel, int64_t n,
                                       const float* bias, uint16_t* y, int64_t n0, int64_t cols,
                                       const char* ahead, int64_t lines) {
  const __mmask16 last = Tail ? lanes_below(cols - 16 * (C - 1)) : __mmask16(0xFFFF);
  __m512 acc[R][C];
  RLHF_UNROLL for (int r = 0; r < R; ++r)
    RLHF_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const int32_t* wi = panel;
  int64_t credit = 0;
  for (int64_t i = 0; i < kp; ++i, wi += kDecodePanel) {
    for (credit += lines; credit >= kp; credit -= kp, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T1);
    __m512bh wv[C];
    RLHF_UNROLL for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(wi + 16 * c);
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * kp + i]);
      RLHF_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xr, wv[c]);
    }
  }
  RLHF_UNROLL for (int c = 0; c < C; ++c) {
    const bool masked = Tail && c == C - 1;
    const __m512 b = bias ? load512(bias + n0 + 16 * c, masked, last) : _mm512_setzero_ps();
    RLHF_UNROLL for (int r = 0; r < R; ++r) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][c], b));
      uint16_t* dst = y + r * n + n0 + 16 * c;
      if (masked)
        _mm256_mask_storeu_epi16(dst, last, out);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), out);
    }
  }
}

/// dst[q * dst_stride + i] = src[i * src_stride + q] for i, q < 16, on 32-bit words (floats, or pairs of bf16): a
/// 16 x 16 block transposed in registers (pairs of 32-bit lanes, then of 64-bit lanes, then 128-bit lanes twice).
/// Strides count words. Zero-masked forms with every lane selected, as elsewhere (GCC 12's unmasked shuffles start
/// from an "undefined" vector).
__attribute__((target("avx512f"))) inline void transpose16x16(const void* src, int64_t src_stride, void* dst,
                                                              int64_t dst_stride) {
  const auto* in = static_cast<const float*>(src);  // the intrinsics below move bits: any 32-bit words will do
  auto* out = static_cast<float*>(dst);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * src_stride);
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane l: rows 2i, 2i + 1 at columns 4l, 4l + 1 (lo) and 4l + 2, 4l + 3
    t[2 * i] = _mm512_maskz_unpacklo_ps(0xFFFF, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_ps(0xFFFF, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane l: rows 4i .. 4i + 3 at column 4l + j
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, c, d));
  }
  for (int j = 0; j < 4; ++j) {  // lanes 0, 2 (0x88) or 1, 3 (0xDD) of each operand
    t[j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {  // column j, 4 + j, 8 + j, 12 + j: rows 0 .. 15
    _mm512_storeu_ps(out + j * dst_stride, _mm512_maskz_shuffle_f32x4(0xFFFF, t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(out + (8 + j) * dst_stride, _mm512_maskz_shuffle_f32x4(0xFFFF, t[j], t[8 + j], 0xDD));
    _mm512_storeu_ps(out + (4 + j) * dst_stride, _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + j], t[12 + j], 0x88));
    _mm512_storeu_ps(out + (12 + j) * dst_stride, _mm512_maskz_shuffle_f32x4(0xFFFF, t[4 + j], t[12 + j], 0xDD));
  }
}

/// pairs[2c] = a[c], pairs[2c + 1] = b[c] for c < 16: two rows of 16 bf16 interleaved into 16 pairs, one
/// two-source permutation (lanes 0-31 index a's vector, 32-63 b's; zero-masked forms as in transpose16x16).
__attribute__((target("avx512f,avx512bw"))) inline void interleave_bf16x16(const uint16_t* a, const uint16_t* b,
                                                                          uint16_t* pairs) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i av = _mm512_maskz_loadu_epi16(0xFFFF, a), bv = _mm512_maskz_loadu_epi16(0xFFFF, b);
  _mm512_storeu_si512(pairs, _mm512_maskz_permutex2var_epi16(0xFFFFFFFF, av, order, bv));
}

/// 16 floats rounded to bf16 as torch rounds them (to nearest even, NaN to 0x7FC0, subnormals kept), each in the
/// low half of a 32-bit lane (the high half zero).
__attribute__((target("avx512f,avx512bw"))) inline __m512i round_bf16_lanes(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(0xFFFF, bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_maskz_srli_epi32(0xFFFF, _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

/// Pairs of rows ahead that the packing of a matrix read row by row across its columns (pack_pairs_from_fp32,
/// gemm_pack_pairs) requests: its rows lie a whole row apart (9 KB for a 768 x 2304 fp32 weight), farther than the
/// hardware prefetchers follow, so each row's few cache lines were waited for. A 768 x 2304 fp32 weight packed into
/// 48-column panels took 0.35 ns per element without, 0.23 with (one thread, weights not in cache; 8 pairs ahead 0.26,
/// 24 pairs 0.24).
inline constexpr int64_t kPackPairsAhead = 16;

/// Requests the cache lines of the `bytes` bytes at `lo` and of those at `hi` (two rows of a matrix).
inline void prefetch_row_pair(const char* lo, const char* hi, int64_t bytes) {
  for (const char* row : {lo, hi}) {
    const auto end = reinterpret_cast<uintptr_t>(row) + bytes;
    for (auto line = reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63}; line < end; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T0);
  }
}

/// Columns [c0, c0 + cols) of a panel of pack_bf16_pairs(w, false) for fp32 `w` [k, n] (row-major), written straight
/// from fp32: pair i of column c is (w[2i, c], w[2i + 1, c]) rounded to bf16, a zero second half past k. `panel`
/// points at the panel's pair (0, 0), `width` pairs per panel row; columns past `cols` are left untouched.
__attribute__((target("avx512f,avx512bw"))) inline void pack_pairs_from_fp32(const float* w, int64_t k, int64_t n,
                                                                            int64_t c0, int64_t cols,
                                                                            uint32_t* panel, int64_t width) {
  for (int64_t kk = 0; kk < k; kk += 2) {
    if (const int64_t ahead = kk + 2 * kPackPairsAhead; ahead + 1 < k)
      prefetch_row_pair(reinterpret_cast<const char*>(w + ahead * n + c0),
                        reinterpret_cast<const char*>(w + (ahead + 1) * n + c0), cols * 4);
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 mask = lanes_below(std::min<int64_t>(16, cols - c));
      const float* top = w + kk * n + c0 + c;
      const __m512i lo = round_bf16_lanes(_mm512_maskz_loadu_ps(mask, top));
      const __m512i hi = kk + 1 < k ? round_bf16_lanes(_mm512_maskz_loadu_ps(mask, top + n)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(panel + kk / 2 * width + c, mask,
                               _mm512_or_si512(lo, _mm512_maskz_slli_epi32(0xFFFF, hi, 16)));
    }
  }
}

/// Rows [r0, r0 + rows) of fp32 `w` [n, k] (row-major) as a panel of pack_bf16_pairs(w, true): pair i of panel
/// column c is (w[r0 + c, 2i], w[r0 + c, 2i + 1]) rounded to bf16 (zero past k), for pairs [0, kp), kp = ceil(k / 2).
/// 16 rows x 16 pairs at a time: each row's 32 floats rounded into one vector of 16 pairs, the block transposed in
/// registers. `panel` points at the panel's pair (0, 0), `width` pairs per panel row; columns past `rows` are left
/// untouched.
__attribute__((target("avx512f,avx512bw"))) inline void pack_pairs_from_fp32_rows(const float* w, int64_t k,
                                                                                 int64_t r0, int64_t rows,
                                                                                 uint32_t* panel, int64_t width) {
  const int64_t kp = (k + 1) / 2;
  alignas(64) uint32_t block[16 * 16], out[16 * 16];
  // The low 16-bit half of each 32-bit lane of two vectors, in order: lanes 0-31 index the first, 32-63 the second.
  const __m512i low_halves = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28,
                                              26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t c = 0; c < rows; c += 16) {
    const int64_t block_rows = std::min<int64_t>(16, rows - c);
    for (int64_t i = 0; i < kp; i += 16) {
      const int64_t pairs = std::min<int64_t>(16, kp - i), floats = std::min<int64_t>(32, k - 2 * i);
      const __mmask16 first = lanes_below(std::min<int64_t>(16, floats));
      const __mmask16 second = floats > 16 ? lanes_below(floats - 16) : __mmask16(0);
      for (int64_t r = 0; r < 16; ++r) {
        __m512i words = _mm512_setzero_si512();
        if (r < block_rows) {
          const float* row = w + (r0 + c + r) * k + 2 * i;
          const __m512i lo = round_bf16_lanes(_mm512_maskz_loadu_ps(first, row));
          const __m512i hi = round_bf16_lanes(_mm512_maskz_loadu_ps(second, row + 16));
          words = _mm512_maskz_permutex2var_epi16(0xFFFFFFFF, lo, low_halves, hi);
        }
        _mm512_store_si512(block + 16 * r, words);
      }
      uint32_t* dst = panel + i * width + c;
      if (pairs == 16 && block_rows == 16) {
        transpose16x16(block, 16, dst, width);
        continue;
      }
      transpose16x16(block, 16, out, 16);  // a tail: only the pairs and columns that exist
      for (int64_t q = 0; q < pairs; ++q)
        for (int64_t r = 0; r < block_rows; ++r) dst[q * width + r] = out[q * 16 + r];
    }
  }
}

/// Rows from which the decode products fetch the next panel of weights into L2 while they compute a panel
/// (Bf16Strips). A panel's first row tile otherwise waits on memory, and its later tiles find it in L2: GPT-2 small's
/// 48 layer products and its vocabulary projection per decoding step, bf16, Zen 5, 2 threads, median ms without ->
/// with: 32 rows 13.0-13.6 -> 11.9-12.2, 16 rows 8.1-8.6 -> 6.1-6.7, 8 rows 6.3 -> 5.9-6.1, 4 rows 4.2-6.0 ->
/// 4.1-5.5; at 2 rows even, at 1 row 3-5% slower (the hardware prefetchers stream the panels on their own then).
inline constexpr int64_t kPrefetchPanelRows = 4;

/// y [m, n] = bf16(bias + x [m, k] w [k, n]) for the columns tile_strips() hands out; x as bf16 pairs [m, kp], w
/// packed by pack_bf16_pairs(). From kPrefetchPanelRows rows, the tiles of a panel fetch the next one into L2.
struct Bf16Strips {
  int64_t m;
  const int32_t* x;
  int64_t kp;
  const int32_t* w;
  int64_t n;
  const float* bias;
  uint16_t* y;
  template <int R>
  RLHF_BF16_TARGET void run(int64_t r, int64_t n0, int64_t cols, int64_t /*next: panels are contiguous*/) const {
    const int32_t* xr = x + r * kp;
    const int32_t* panel = w + n0 / kDecodePanel * kp * kDecodePanel;
    uint16_t* yr = y + r * n;
    // the next panel into L2 while this one computes, each tile its share of the lines in proportion to its rows
    const char* ahead = nullptr;
    int64_t lines = 0;
    if (m >= kPrefetchPanelRows && n0 + kDecodePanel < n) {
      const int64_t panel_lines = kp * kDecodePanel * 4 / 64, l0 = panel_lines * r / m;
      ahead = reinterpret_cast<const char*>(panel + kp * kDecodePanel) + 64 * l0;
      lines = panel_lines * (r + R) / m - l0;
    }
    if (cols == 48) return bf16_tile<R, 3, false>(xr, kp, panel, n, bias, yr, n0, cols, ahead, lines);
    if (cols > 32) return bf16_tile<R, 3, true>(xr, kp, panel, n, bias, yr, n0, cols, ahead, lines);
    if (cols > 16) return bf16_tile<R, 2, true>(xr, kp, panel, n, bias, yr, n0, cols, ahead, lines);
    bf16_tile<R, 1, true>(xr, kp, panel, n, bias, yr, n0, cols, ahead, lines);
  }
};

#undef RLHF_BF16_TARGET
#undef RLHF_UNROLL

#endif

/// Whether the kernels may take this product: see the file comment.
inline bool small_matmul_applies(std::initializer_list<const torch::Tensor*> tensors) {
  if (decode_isa() == DecodeIsa::none || autocast_enabled(torch::kCPU)) return false;
  const bool grad_mode = torch::GradMode::is_enabled();
  for (const auto* t : tensors) {
    if (!t->defined()) continue;
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat || t->layout() != torch::kStrided ||
        !t->is_contiguous() || t->is_conj() || t->is_neg())
      return false;
    if (grad_mode && t->requires_grad()) return false;
  }
  return true;
}

/// The bytes of a tensor as the bf16 kernels read them: bf16 pairs as 32-bit words.
inline const int32_t* bf16_pairs_data(const torch::Tensor& t) { return static_cast<const int32_t*>(t.data_ptr()); }

}  // namespace detail

/// `w` [K, N] fp32 in the layout of the fp32 decode kernels inside a DecodePackScope: panels of 48 columns,
/// [ceil(N / 48), K, 48], where [p, kk, c] holds w[kk, 48p + c] (zero past N). A tile's strip is then one
/// contiguous block read front to back; in w's own layout consecutive k lie N x 4 bytes apart, and a 48-column strip
/// read row by row ran at 28-45 GB/s on Zen 5 (GPT-2 small's 48 layer products at 1-16 rows) where one pass over
/// contiguous memory runs at 70-85.
inline torch::Tensor pack_fp32_panels(const torch::Tensor& w) {
  if (w.dim() != 2 || w.scalar_type() != torch::kFloat)
    detail::fail("pack_fp32_panels: expected an fp32 matrix, got {} of {} dimensions", c10::toString(w.scalar_type()),
                 w.dim());
  constexpr int64_t width = detail::kDecodePanel;
  const int64_t k = w.size(0), n = w.size(1), panels = (n + width - 1) / width;
  const int64_t full = n / width, tail = n - full * width;
  auto out = tail ? torch::zeros({panels, k, width}, w.options()) : torch::empty({panels, k, width}, w.options());
  if (full > 0)  // one strided copy (threaded by torch): out[p, kk, c] = w[kk, 48p + c]
    out.narrow(0, 0, full).permute({1, 0, 2}).copy_(w.narrow(1, 0, full * width).reshape({k, full, width}));
  if (tail) out[full].narrow(1, 0, tail).copy_(w.narrow(1, full * width, tail));
  return out;
}

/// `w` [K, N] (with `transposed`, `w`^T for `w` [N, K]) in the layout of the bf16 decode kernels: bf16 pairs along
/// k in panels of 48 columns, [ceil(N / 48), ceil(K / 2), 48, 2], where [p, i, c] holds w[2i, 48p + c] and
/// w[2i + 1, 48p + c] (zero past K and N). Rounds to bf16 as torch's casts do (to nearest even).
inline torch::Tensor pack_bf16_pairs(const torch::Tensor& w, bool transposed) {
  if (w.dim() != 2) detail::fail("pack_bf16_pairs: expected a matrix, got a tensor of {} dimensions", w.dim());
  constexpr int64_t width = detail::kDecodePanel;
  const int64_t k = w.size(transposed ? 1 : 0), n = w.size(transposed ? 0 : 1), kp = (k + 1) / 2;
  const int64_t panels = (n + width - 1) / width;
  const auto options = torch::TensorOptions().dtype(torch::kBFloat16);
  // With AVX-512 BW an fp32 weight is rounded and packed in one pass (no bf16 copy of it first, no zero fill but the
  // last panel's columns past n); otherwise the full 16 x 16 blocks (transposed: of bf16 pairs as 32-bit words,
  // k even) and 16-column runs of row pairs of the bf16 weight are moved in registers, the rest one value at a time.
  const bool vector = detail::cpu_decode_isa() >= DecodeIsa::avx512_bf16;
#if defined(__GNUC__) && defined(__x86_64__)
  if (vector && w.scalar_type() == torch::kFloat && w.is_contiguous() && w.device().is_cpu()) {
    auto out = torch::empty({panels, kp, width, 2}, options);
    if (n % width) out[panels - 1].zero_();
    const float* src = w.data_ptr<float>();
    auto* dst = static_cast<uint32_t*>(out.data_ptr());
    detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
      const auto [p0, p1] = detail::thread_share(panels, 1, thread, threads);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c1 = std::min(width, n - p * width);
        if (transposed)
          detail::pack_pairs_from_fp32_rows(src, k, p * width, c1, dst + p * kp * width, width);
        else
          detail::pack_pairs_from_fp32(src, k, n, p * width, c1, dst + p * kp * width, width);
      }
    });
    return out;
  }
#endif
  auto out = torch::zeros({panels, kp, width, 2}, options);  // bf16 zero: all bits clear
  auto w16 = w.to(torch::kBFloat16).contiguous();
  const auto* src = static_cast<const uint16_t*>(w16.data_ptr());
  auto* dst = static_cast<uint16_t*>(out.data_ptr());
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [p0, p1] = detail::thread_share(panels, 1, thread, threads);
    for (int64_t p = p0; p < p1; ++p) {
      uint16_t* panel = dst + p * kp * width * 2;
      const int64_t c1 = std::min(width, n - p * width);
      if (transposed) {
        // Panel pairs [0, i_full) of columns [0, c_full) in 16 x 16 blocks: row 48p + c of w [N, K] is kp words.
        const int64_t c_full = vector && k % 2 == 0 ? c1 / 16 * 16 : 0, i_full = c_full > 0 ? kp / 16 * 16 : 0;
#if defined(__GNUC__) && defined(__x86_64__)
        for (int64_t c = 0; c < c_full; c += 16)
          for (int64_t i = 0; i < i_full; i += 16)
            detail::transpose16x16(src + ((p * width + c) * kp + i) * 2, kp, panel + (i * width + c) * 2, width);
#endif
        for (int64_t c = 0; c < c1; ++c) {  // row 48p + c of w [N, K]: column c of the panel
          const uint16_t* row = src + (p * width + c) * k;
          for (int64_t kk = c < c_full ? 2 * i_full : 0; kk < k; ++kk)
            panel[(kk / 2 * width + c) * 2 + kk % 2] = row[kk];
        }
      } else {
        for (int64_t kk = 0; kk < k; kk += 2) {  // rows kk, kk + 1 of w [K, N], columns 48p ..: panel row kk / 2
          const uint16_t* row = src + kk * n + p * width;
          uint16_t* pairs = panel + kk / 2 * width * 2;
          int64_t c = 0;
#if defined(__GNUC__) && defined(__x86_64__)
          if (vector && kk + 1 < k)
            for (; c + 16 <= c1; c += 16) detail::interleave_bf16x16(row + c, row + n + c, pairs + 2 * c);
#endif
          for (; c < c1; ++c) {
            pairs[2 * c] = row[c];
            if (kk + 1 < k) pairs[2 * c + 1] = row[n + c];
          }
        }
      }
    }
  });
  return out;
}

/// While one is open in a thread, that thread's few-row products read each weight in a layout packed once for the
/// decode kernels and kept until the scope closes: products torch would compute in bf16 (under bf16 autocast, or
/// with every operand bf16) run on the AVX512-BF16 kernels where the CPU has them (bf16 inputs, fp32 sums, a bf16
/// result, as torch's bf16 addmm; weights packed by pack_bf16_pairs()), and fp32 products of small_rows_addmm read
/// their weights from contiguous panels (pack_fp32_panels()). A weight changed in place (its version counter moved)
/// or given new storage is packed again. The biases of bf16 products are kept too, rounded to bf16 once (as torch
/// rounds them on every call). generate() opens one unless one is open already, so a rollout packs every weight once
/// (GPT-2 small: 250 MB held while it runs in bf16, 340 MB in fp32, where the tied vocabulary projection reads wte in
/// place), and a program that samples again and again packs them once while it keeps a scope open.
/// Without an open scope products go to torch (bf16) or read the weights in place (fp32): packing a weight for one
/// product would cost more than it saves.
class DecodePackScope {
 public:
  DecodePackScope() : outer_(current()) { current() = this; }
  ~DecodePackScope() { current() = outer_; }
  DecodePackScope(const DecodePackScope&) = delete;
  DecodePackScope& operator=(const DecodePackScope&) = delete;

  /// The innermost scope open in this thread, or null.
  static DecodePackScope* active() { return current(); }

  /// `w` packed by pack_bf16_pairs(w, transposed), made on first use.
  const torch::Tensor& pairs(const torch::Tensor& w, bool transposed) {
    return packed(w, transposed ? Layout::bf16_pairs_transposed : Layout::bf16_pairs);
  }

  /// `w` packed by pack_fp32_panels(w), made on first use.
  const torch::Tensor& panels(const torch::Tensor& w) { return packed(w, Layout::fp32_panels); }

  /// `bias` rounded to bf16 and back to fp32 (contiguous), as torch's bf16 addmm adds it to the fp32 sums, made on
  /// first use.
  const torch::Tensor& rounded_bias(const torch::Tensor& bias) { return packed(bias, Layout::bf16_rounded); }

  /// Bytes of the packed weights held.
  int64_t bytes() const {
    int64_t total = 0;
    for (const auto& [key, entry] : packs_) total += static_cast<int64_t>(entry.packed.nbytes());
    return total;
  }

 private:
  enum class Layout { bf16_pairs, bf16_pairs_transposed, fp32_panels, bf16_rounded };
  struct Entry {
    torch::Tensor source;  // holds the weight, so its TensorImpl (the key) is not reused while the entry lives
    torch::Tensor packed;
    const void* data = nullptr;
    int64_t version = -1;
  };
  const torch::Tensor& packed(const torch::Tensor& w, Layout layout) {
    auto& entry = packs_[{w.unsafeGetTensorImpl(), layout}];
    const int64_t version = w.is_inference() ? 0 : static_cast<int64_t>(w._version());
    if (!entry.packed.defined() || entry.data != w.data_ptr() || entry.version != version)
      entry = {w, pack(w, layout), w.data_ptr(), version};
    return entry.packed;
  }
  static torch::Tensor pack(const torch::Tensor& w, Layout layout) {
    switch (layout) {
      case Layout::fp32_panels: return pack_fp32_panels(w);
      case Layout::bf16_rounded: return w.to(torch::kBFloat16).to(torch::kFloat).contiguous();
      default: return pack_bf16_pairs(w, layout == Layout::bf16_pairs_transposed);
    }
  }
  static DecodePackScope*& current() {
    static thread_local DecodePackScope* scope = nullptr;
    return scope;
  }
  std::map<std::pair<const c10::TensorImpl*, Layout>, Entry> packs_;
  DecodePackScope* outer_;
};

namespace detail {

/// Whether the bf16 kernels may take a product of these operands: a DecodePackScope is open, the CPU has AVX512-BF16
/// (and set_decode_isa() allows it), torch would compute the product in bf16 (bf16 autocast on the CPU with fp32 or
/// bf16 operands, or every operand bf16), and the other conditions of small_matmul_applies() hold.
inline bool bf16_kernels_apply(std::initializer_list<const torch::Tensor*> tensors) {
  if (decode_isa() < DecodeIsa::avx512_bf16 || !DecodePackScope::active()) return false;
  const bool autocast = autocast_enabled(torch::kCPU);
  if (autocast && autocast_dtype(torch::kCPU) != torch::kBFloat16) return false;
  const bool grad_mode = torch::GradMode::is_enabled();
  for (const auto* t : tensors) {
    if (!t->defined()) continue;
    const auto dtype = t->scalar_type();
    if (dtype != torch::kBFloat16 && !(autocast && dtype == torch::kFloat)) return false;
    if (!t->device().is_cpu() || t->layout() != torch::kStrided || !t->is_contiguous() || t->is_conj() ||
        t->is_neg() || (grad_mode && t->requires_grad()))
      return false;
  }
  return true;
}

/// bf16(`bias` + `x` w) with w = `w` (or with `transposed`, `w`^T) on the bf16 kernels, with w from the open
/// DecodePackScope; undefined when bf16_kernels_apply() does not hold. Shapes are the caller's to check.
inline torch::Tensor small_rows_bf16(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w,
                                     bool transposed) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (!bf16_kernels_apply({&bias, &x, &w})) return {};
  const auto& pairs = DecodePackScope::active()->pairs(w, transposed);
  const int64_t m = x.size(0), kp = pairs.size(1), n = transposed ? w.size(0) : w.size(1);
  auto x16 = x.to(torch::kBFloat16);
  if (x16.size(1) % 2) x16 = torch::constant_pad_nd(x16, {0, 1});  // [M, 2 kp]
  x16 = x16.contiguous();
  // torch casts the bias to bf16 too, and adds it to the fp32 sums
  const auto b = bias.defined() ? DecodePackScope::active()->rounded_bias(bias) : torch::Tensor();
  auto y = torch::empty({m, n}, x.options().dtype(torch::kBFloat16));
  const Bf16Strips strips{m, bf16_pairs_data(x16), kp, bf16_pairs_data(pairs), n,
                          b.defined() ? b.data_ptr<float>() : nullptr, static_cast<uint16_t*>(y.data_ptr())};
  omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = thread_share(n, kDecodePanel, thread, threads);  // whole panels
    if (c0 < c1) tile_strips(m, c0, c1, strips);
  });
  return y;
#else
  return {};
#endif
}

}  // namespace detail

/// `bias` [N] (or undefined) + `x` [M, K] `w` [K, N] under the conditions of the file comment: fp32 for
/// M <= small_rows_addmm_max_rows(), bf16 at any M inside a DecodePackScope; undefined when they do not hold (use
/// torch::addmm then, or linear_addmm (core/gemm.hpp), which does).
inline torch::Tensor small_rows_addmm(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() != 2 || w.dim() != 2 || x.size(0) < 1 || x.size(1) != w.size(0) ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != w.size(1))))
    return {};
  if (auto y = detail::small_rows_bf16(bias, x, w, /*transposed=*/false); y.defined()) return y;
  if (x.size(0) > small_rows_addmm_max_rows() || !detail::small_matmul_applies({&bias, &x, &w})) return {};
  const int64_t m = x.size(0), k = x.size(1), n = w.size(1);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool avx512 = decode_isa() >= DecodeIsa::avx512;
  // Inside a DecodePackScope the AVX-512 tiles read w from contiguous panels, packed once per scope.
  const torch::Tensor* panels = avx512 && DecodePackScope::active() ? &DecodePackScope::active()->panels(w) : nullptr;
  const float* wp = panels ? panels->data_ptr<float>() : w.data_ptr<float>();
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = detail::thread_share(n, avx512 ? detail::kDecodePanel : 16, thread, threads);
    if (c0 >= c1) return;
    if (avx512)
      detail::tile_strips(m, c0, c1, detail::AddmmStrips512{xp, k, wp, n, bp, yp, panels != nullptr});
    else
      detail::addmm_columns(xp, m, k, wp, n, bp, yp, c0, c1);
  });
  return y;
#else
  return {};
#endif
}

/// `x` [M, K] `e`^T with `e` [N, K] under the conditions of the file comment: fp32 for M <= kSmallRowsMmNt, bf16 at
/// any M inside a DecodePackScope; undefined when they do not hold (use torch::matmul then).
inline torch::Tensor small_rows_mm_nt(const torch::Tensor& x, const torch::Tensor& e) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() != 2 || e.dim() != 2 || x.size(0) < 1 || x.size(1) != e.size(1)) return {};
  if (auto y = detail::small_rows_bf16({}, x, e, /*transposed=*/true); y.defined()) return y;
  if (x.size(0) > kSmallRowsMmNt || !detail::small_matmul_applies({&x, &e})) return {};
  const int64_t m = x.size(0), k = x.size(1), n = e.size(0);
  auto y = torch::empty({m, n}, x.options());
  const float *xp = x.data_ptr<float>(), *ep = e.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx512 = decode_isa() >= DecodeIsa::avx512;
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = detail::thread_share(n, avx512 ? 6 : 4, thread, threads);
    if (c0 >= c1) return;
    if (avx512)
      detail::mm_nt_columns512(xp, m, k, ep, n, yp, c0, c1);
    else
      detail::mm_nt_columns(xp, m, k, ep, n, yp, c0, c1);
  });
  return y;
#else
  return {};
#endif
}

}  // namespace rlhf
