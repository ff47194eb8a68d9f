#pragma once
/// @file Matrix products with few rows, for decoding on the CPU in fp32. A decoding step multiplies a handful of rows
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
/// Each has an AVX-512 and an AVX2 + FMA version; the best the CPU has runs, capped by set_decode_isa(). Both return
/// an undefined tensor (and the caller uses torch's operator) unless: the CPU has AVX2 and FMA, every tensor is
/// fp32, dense and on the CPU, no autograd graph is needed (inference mode or no_grad, or nothing requires a
/// gradient), autocast is off, and the decode kernels are enabled (set_decode_kernels(); on by default). Results
/// equal torch's up to float summation order (~1e-6 relative).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <utility>

#include <dlfcn.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/precision.hpp>

namespace rlhf {

/// Instruction sets of the decode kernels, in increasing order.
enum class DecodeIsa { none, avx2, avx512 };

namespace detail {

inline std::atomic<DecodeIsa>& decode_isa_cap() {
  static std::atomic<DecodeIsa> cap{DecodeIsa::avx512};
  return cap;
}

/// The best instruction set of this CPU for the kernels (AVX2 counts only with FMA).
inline DecodeIsa cpu_decode_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const DecodeIsa isa = __builtin_cpu_supports("avx512f")                                    ? DecodeIsa::avx512
                               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? DecodeIsa::avx2
                                                                                                   : DecodeIsa::none;
  return isa;
#else
  return DecodeIsa::none;
#endif
}

}  // namespace detail

/// Caps the instruction set of the few-row fp32 decode kernels for the whole process (DecodeIsa::avx512, the
/// default, lets the CPU's best run; DecodeIsa::none turns the kernels off). For benchmarks and tests that compare
/// the versions.
inline void set_decode_isa(DecodeIsa cap) { detail::decode_isa_cap() = cap; }

/// The instruction set the decode kernels run with: the CPU's best, capped by set_decode_isa().
inline DecodeIsa decode_isa() { return std::min(detail::cpu_decode_isa(), detail::decode_isa_cap().load()); }

/// Turns the few-row fp32 decode kernels on (the CPU's best instruction set) or off for the whole process (on by
/// default); off, every product goes through torch's addmm / matmul. For benchmarks that show what the kernels save.
inline void set_decode_kernels(bool on) { set_decode_isa(on ? DecodeIsa::avx512 : DecodeIsa::none); }

/// Whether the few-row fp32 decode kernels are switched on (they also need AVX2 and FMA to run).
inline bool decode_kernels_enabled() { return detail::decode_isa_cap() != DecodeIsa::none; }

/// Rows up to which small_rows_addmm takes a product with the kernels' present instruction set (beyond, sgemm's
/// packing pays for itself); 0 when the kernels do not run.
inline int64_t small_rows_addmm_max_rows() {
  switch (decode_isa()) {
    case DecodeIsa::avx512: return 64;
    case DecodeIsa::avx2: return 8;
    default: return 0;
  }
}

/// Rows up to which small_rows_mm_nt takes a product.
inline constexpr int64_t kSmallRowsMmNt = 32;

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
  for (int r = 0; r < R; ++r) {
    acc[r][0] = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    acc[r][1] = bias ? _mm256_loadu_ps(bias + n0 + 8) : _mm256_setzero_ps();
  }
  const float* wk = w + n0;
  for (int64_t kk = 0; kk < k; ++kk, wk += n) {
    const __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * k + kk);
      acc[r][0] = _mm256_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
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
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
  const float* rows[J];
  for (int j = 0; j < J; ++j) rows[j] = e + (n0 + j) * k;
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    __m256 ej[J];
    for (int j = 0; j < J; ++j) ej[j] = _mm256_loadu_ps(rows[j] + kk);
    for (int r = 0; r < R; ++r) {
      const __m256 xr = _mm256_loadu_ps(x + r * k + kk);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
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
// 35 ms; at 64 rows 60 against 74-80). Column and k tails go through masked loads and stores.

/// All lanes below `count` (at most 16).
inline __mmask16 lanes_below(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
}

/// 16 floats from `p`, or with `masked` only the lanes of `mask` (the others 0, their memory not read).
__attribute__((target("avx512f"))) inline __m512 load512(const float* p, bool masked, __mmask16 mask) {
  return masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
}

/// y[r, n0 .. n0 + cols) = bias + x[r, :] w[:, n0 .. n0 + cols) for R rows, with C vectors of 16 columns; with
/// Tail, the last vector is masked to `cols` (the other loads and stores stay unmasked).
template <int R, int C, bool Tail>
__attribute__((target("avx512f"))) inline void addmm_tile512(const float* x, int64_t k, const float* w, int64_t n,
                                                             const float* bias, float* y, int64_t n0, int64_t cols) {
  const __mmask16 last = Tail ? lanes_below(cols - 16 * (C - 1)) : __mmask16(0xFFFF);
  __m512 acc[R][C];
  for (int c = 0; c < C; ++c) {
    const __m512 b = bias ? load512(bias + n0 + 16 * c, Tail && c == C - 1, last) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][c] = b;
  }
  const float* wk = w + n0;
  for (int64_t kk = 0; kk < k; ++kk, wk += n) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load512(wk + 16 * c, Tail && c == C - 1, last);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * k + kk]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xr, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float* out = y + r * n + n0 + 16 * c;
      if (Tail && c == C - 1)
        _mm512_mask_storeu_ps(out, last, acc[r][c]);
      else
        _mm512_storeu_ps(out, acc[r][c]);
    }
}

/// A tile of R rows: 48 full columns, or the strip's last 1-47 columns.
template <int R>
__attribute__((target("avx512f"))) inline void addmm_strip512(const float* x, int64_t k, const float* w, int64_t n,
                                                              const float* bias, float* y, int64_t n0, int64_t cols) {
  if (cols == 48) return addmm_tile512<R, 3, false>(x, k, w, n, bias, y, n0, cols);
  if (cols > 32) return addmm_tile512<R, 3, true>(x, k, w, n, bias, y, n0, cols);
  if (cols > 16) return addmm_tile512<R, 2, true>(x, k, w, n, bias, y, n0, cols);
  addmm_tile512<R, 1, true>(x, k, w, n, bias, y, n0, cols);
}

/// y [m, n] = bias + x [m, k] w [k, n] for columns [c0, c1): strips of 48 columns, each in row tiles of at most 8
/// rows of near-equal size (16 rows: 8 + 8; 12 rows: 6 + 6).
__attribute__((target("avx512f"))) inline void addmm_columns512(const float* x, int64_t m, int64_t k, const float* w,
                                                                int64_t n, const float* bias, float* y, int64_t c0,
                                                                int64_t c1) {
  const int64_t tiles = (m + 7) / 8;
  for (int64_t n0 = c0; n0 < c1; n0 += 48) {
    const int64_t cols = std::min<int64_t>(48, c1 - n0);
    for (int64_t t = 0, r = 0; t < tiles; ++t) {
      const int64_t rows = m / tiles + (t < m % tiles ? 1 : 0);
      const float* xr = x + r * k;
      float* yr = y + r * n;
      switch (rows) {
        case 1: addmm_strip512<1>(xr, k, w, n, bias, yr, n0, cols); break;
        case 2: addmm_strip512<2>(xr, k, w, n, bias, yr, n0, cols); break;
        case 3: addmm_strip512<3>(xr, k, w, n, bias, yr, n0, cols); break;
        case 4: addmm_strip512<4>(xr, k, w, n, bias, yr, n0, cols); break;
        case 5: addmm_strip512<5>(xr, k, w, n, bias, yr, n0, cols); break;
        case 6: addmm_strip512<6>(xr, k, w, n, bias, yr, n0, cols); break;
        case 7: addmm_strip512<7>(xr, k, w, n, bias, yr, n0, cols); break;
        default: addmm_strip512<8>(xr, k, w, n, bias, yr, n0, cols); break;
      }
      r += rows;
    }
  }
}

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
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* rows[J];
  for (int j = 0; j < J; ++j) rows[j] = e + (n0 + j) * k;
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    __m512 ej[J];
    for (int j = 0; j < J; ++j) ej[j] = _mm512_loadu_ps(rows[j] + kk);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_loadu_ps(x + r * k + kk);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  if (kk < k) {
    const __mmask16 mask = lanes_below(k - kk);
    __m512 ej[J];
    for (int j = 0; j < J; ++j) ej[j] = _mm512_maskz_loadu_ps(mask, rows[j] + kk);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_maskz_loadu_ps(mask, x + r * k + kk);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, ej[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) y[r * n + n0 + j] = sum_lanes512(acc[r][j]);
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

}  // namespace detail

/// `bias` [N] (or undefined) + `x` [M, K] `w` [K, N] for M <= small_rows_addmm_max_rows() under the conditions of
/// the file comment; undefined when they do not hold (use torch::addmm then).
inline torch::Tensor small_rows_addmm(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() != 2 || w.dim() != 2 || x.size(0) < 1 || x.size(0) > small_rows_addmm_max_rows() ||
      x.size(1) != w.size(0) || (bias.defined() && (bias.dim() != 1 || bias.size(0) != w.size(1))) ||
      !detail::small_matmul_applies({&bias, &x, &w}))
    return {};
  const int64_t m = x.size(0), k = x.size(1), n = w.size(1);
  auto y = torch::empty({m, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool avx512 = decode_isa() == DecodeIsa::avx512;
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = detail::thread_share(n, avx512 ? 48 : 16, thread, threads);
    if (c0 >= c1) return;
    if (avx512)
      detail::addmm_columns512(xp, m, k, wp, n, bp, yp, c0, c1);
    else
      detail::addmm_columns(xp, m, k, wp, n, bp, yp, c0, c1);
  });
  return y;
#else
  return {};
#endif
}

/// `x` [M, K] `e`^T with `e` [N, K] for M <= kSmallRowsMmNt under the conditions of the file comment; undefined
/// when they do not hold (use torch::matmul then).
inline torch::Tensor small_rows_mm_nt(const torch::Tensor& x, const torch::Tensor& e) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() != 2 || e.dim() != 2 || x.size(0) < 1 || x.size(0) > kSmallRowsMmNt || x.size(1) != e.size(1) ||
      !detail::small_matmul_applies({&x, &e}))
    return {};
  const int64_t m = x.size(0), k = x.size(1), n = e.size(0);
  auto y = torch::empty({m, n}, x.options());
  const float *xp = x.data_ptr<float>(), *ep = e.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx512 = decode_isa() == DecodeIsa::avx512;
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
