#pragma once
/// @file Matrix products with few rows, for decoding on the CPU in fp32. A decoding step multiplies a handful of rows
/// (one per sequence) by every weight matrix, so its speed is the speed of reading the weights. OpenBLAS's sgemm
/// packs the whole right-hand matrix before multiplying, which at one to four rows reads and writes each weight
/// several times (a 768 x 2304 product at one row: 0.20 ms with sgemm against 0.05 ms for one pass), and the tied
/// vocabulary projection (hidden x wte^T, wte [V, D]) is slower still: 12-18 ms for 50257 x 768 at 1-16 rows, where
/// one pass over the 154 MB table takes 4.4 ms. These kernels read each weight once per call, threaded over the
/// output columns on the OpenMP runtime LibTorch itself uses:
///
/// - small_rows_addmm(bias, x, w): y = x w + bias with w [K, N] (Conv1D's layout), for at most 8 rows;
/// - small_rows_mm_nt(x, e): y = x e^T with e [N, K] (the vocabulary projection), for at most 32 rows.
///
/// Both return an undefined tensor (and the caller uses torch's operator) unless: the CPU has AVX2 and FMA, every
/// tensor is fp32, dense and on the CPU, no autograd graph is needed (inference mode or no_grad, or nothing
/// requires a gradient), autocast is off, and the decode kernels are enabled (set_decode_kernels(); on by default).
/// Results equal torch's up to float summation order (~1e-6 relative).

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

namespace detail {

inline std::atomic<bool>& decode_kernels_flag() {
  static std::atomic<bool> on{true};
  return on;
}

}  // namespace detail

/// Turns the few-row fp32 decode kernels on or off for the whole process (on by default); off, every product goes
/// through torch's addmm / matmul. For benchmarks that show what the kernels save.
inline void set_decode_kernels(bool on) { detail::decode_kernels_flag() = on; }

/// Whether the few-row fp32 decode kernels are switched on (they also need AVX2 and FMA to run).
inline bool decode_kernels_enabled() { return detail::decode_kernels_flag(); }

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

inline bool avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

#else
inline bool avx2_fma() { return false; }
#endif

/// Whether the kernels may take this product: see the file comment.
inline bool small_matmul_applies(std::initializer_list<const torch::Tensor*> tensors) {
  if (!decode_kernels_enabled() || !avx2_fma() || autocast_enabled(torch::kCPU)) return false;
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

/// Rows up to which small_rows_addmm takes a product (beyond, sgemm's packing pays for itself).
inline constexpr int64_t kSmallRowsAddmm = 8;
/// Rows up to which small_rows_mm_nt takes a product.
inline constexpr int64_t kSmallRowsMmNt = 32;

/// `bias` [N] (or undefined) + `x` [M, K] `w` [K, N] for M <= kSmallRowsAddmm under the conditions of the file
/// comment; undefined when they do not hold (use torch::addmm then).
inline torch::Tensor small_rows_addmm(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() != 2 || w.dim() != 2 || x.size(0) < 1 || x.size(0) > kSmallRowsAddmm || x.size(1) != w.size(0) ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != w.size(1))) ||
      !detail::small_matmul_applies({&bias, &x, &w}))
    return {};
  const int64_t m = x.size(0), k = x.size(1), n = w.size(1);
  auto y = torch::empty({m, n}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = detail::thread_share(n, 16, thread, threads);
    if (c0 < c1) detail::addmm_columns(xp, m, k, wp, n, bp, yp, c0, c1);
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
  detail::omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [c0, c1] = detail::thread_share(n, 4, thread, threads);
    if (c0 < c1) detail::mm_nt_columns(xp, m, k, ep, n, yp, c0, c1);
  });
  return y;
#else
  return {};
#endif
}

}  // namespace rlhf
