#pragma once
/// @file fp32 matrix products on AVX-512 for the layers of training and of long forwards: y = bias + a b with
/// either operand transposed (any strides), and autograd nodes for the two products of GPT-2, the linear layers
/// (x w + b, w [in, out]) and the tied vocabulary projection (h wte^T), whose backward takes the same kernels.
///
/// Why: LibTorch computes fp32 products with OpenBLAS, whose kernels are chosen for the CPU when it loads. OpenBLAS
/// 0.3.21 (Debian 12) predates AMD's AVX-512 parts; where OPENBLAS_CORETYPE pins it to its Haswell (AVX2) kernels
/// (a setting such machines get because older OpenBLAS builds fail on them), half of each 512-bit FMA unit idles:
/// GPT-2 small's layer products of a training minibatch (528 x 768 x 3072) ran at 0.23-0.24 TFLOP/s with sgemm and
/// at 0.38-0.42 here, on Zen 5 with two threads. Unpinned, OpenBLAS takes its Cooperlake (AVX-512) kernels there and
/// reaches 0.36-0.40: these kernels then match it rather than beat it.
///
/// The method is the one of BLIS and OpenBLAS: both operands are packed in blocks (b: kGemmKc rows x kGemmNc
/// columns, in panels of kGemmNr = 48 columns; a: kGemmMc x kGemmKc, in panels of kGemmMr = 8 rows, each k's 8
/// values together), and an 8 x 48 tile of the result (24 of the 32 vector registers) takes one k at a time: three
/// vectors of b, eight broadcasts of a, 24 FMAs. The packing reads any strides, so transposed operands (the
/// backward's w^T and x^T, the projection's wte^T, transposed 16 x 16 blocks at a time) cost a packing pass and no
/// copy. Results are the float sums in a fixed order (blocks of kGemmKc along k), whatever the number of threads;
/// they differ from sgemm's by float rounding (~1e-6 relative).
///
/// gemm_applies() says when they run: fp32 CPU tensors, a CPU with AVX-512 F, set_decode_isa() at avx512 or above,
/// and autocast off. Elsewhere (CUDA, bf16, other CPUs) the callers use torch's operators.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/precision.hpp>
#include <rlhf/core/small_matmul.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

namespace detail {

/// Block sizes: a tile's rows and columns, and the k, row and column extents of the packed blocks (a's block
/// kMc x kKc = 128 KB stays in L2; b's panel kKc x kNr = 48 KB is read from L1 by every row tile of a block).
inline constexpr int64_t kGemmMr = 8, kGemmNr = 48, kGemmKc = 256, kGemmMc = 128, kGemmNc = 3072;

/// A read-only view of a matrix with any strides: element (i, j) at data[i * row_stride + j * col_stride].
struct StridedMatrix {
  const float* data;
  int64_t row_stride, col_stride;
};

#if defined(__GNUC__) && defined(__x86_64__)

#define RLHF_GEMM_UNROLL _Pragma("GCC unroll 16")

/// What a tile's sums are added to in its vector j of a result row: the bias (or 0) on the first block of k, the
/// row's sums so far on the others (lanes outside `mask` 0).
__attribute__((target("avx512f"))) inline __m512 gemm_tile_base(const float* row, int j, __mmask16 mask, bool first,
                                                                const float* bias) {
  if (!first) return _mm512_maskz_loadu_ps(mask, row + 16 * j);
  return bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
}

/// c[r, j] (r < rows, j < cols, row stride ldc) = (first ? bias[j] or 0 : c[r, j]) + sum_p a[p, r] b[p, j] over the
/// packed panels a [kc, kGemmMr] and b [kc, kGemmNr]; `bias` may be null.
__attribute__((target("avx512f"))) inline void gemm_tile(int64_t kc, const float* a, const float* b, float* c,
                                                         int64_t ldc, int64_t rows, int64_t cols, bool first,
                                                         const float* bias) {
  constexpr int R = static_cast<int>(kGemmMr), C = static_cast<int>(kGemmNr / 16);
  __m512 acc[R][C];
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r)
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p, a += R, b += kGemmNr) {
    __m512 bv[C];
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) bv[j] = _mm512_loadu_ps(b + 16 * j);
    RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
      RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_fmadd_ps(ar, bv[j], acc[r][j]);
    }
  }
  if (rows == R && cols == kGemmNr) {
    RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
      float* row = c + r * ldc;
      RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j)
        _mm512_storeu_ps(row + 16 * j, _mm512_add_ps(acc[r][j], gemm_tile_base(row, j, 0xFFFF, first, bias)));
    }
    return;
  }
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    float* row = c + r * ldc;
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) {
      const int64_t left = cols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = lanes_below(left);
      _mm512_mask_storeu_ps(row + 16 * j, mask, _mm512_add_ps(acc[r][j], gemm_tile_base(row, j, mask, first, bias)));
    }
  }
}

#undef RLHF_GEMM_UNROLL

#endif

/// Rows [i0, i0 + mc) and k [p0, p0 + kc) of `a` into panels of kGemmMr rows: panel q holds, for each k, the values
/// of its rows (rows past mc are 0).
inline void gemm_pack_a(const StridedMatrix& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t i = 0; i < mc; i += kGemmMr, out += kGemmMr * kc) {
    const int64_t rows = std::min(kGemmMr, mc - i);
    for (int64_t r = 0; r < kGemmMr; ++r) {
      if (r >= rows) {
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = 0.0f;
        continue;
      }
      const float* src = a.data + (i0 + i + r) * a.row_stride + p0 * a.col_stride;
      if (a.col_stride == 1)
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = src[p];
      else
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = src[p * a.col_stride];
    }
  }
}

/// Rows (k) [p0, p0 + kc) and columns [j0, j0 + nc) of `b` into panels of kGemmNr columns: panel q holds, for each
/// k, the values of its columns (columns past nc are 0).
inline void gemm_pack_b(const StridedMatrix& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t j = 0; j < nc; j += kGemmNr, out += kGemmNr * kc) {
    const int64_t cols = std::min(kGemmNr, nc - j);
    const float* src = b.data + p0 * b.row_stride + (j0 + j) * b.col_stride;
    if (b.col_stride == 1) {  // rows of b contiguous: copy row segments
      for (int64_t p = 0; p < kc; ++p) {
        const float* from = src + p * b.row_stride;
        float* to = out + p * kGemmNr;
        std::copy(from, from + cols, to);
        std::fill(to + cols, to + kGemmNr, 0.0f);
      }
    } else {  // columns of b not contiguous (b = e^T): 16 x 16 blocks transposed, the rest one value at a time
      int64_t full = 0;  // columns [0, full) x k [0, kc_full) go through transpose16x16
      const int64_t kc_full = b.row_stride == 1 ? kc / 16 * 16 : 0;
#if defined(__GNUC__) && defined(__x86_64__)
      if (kc_full > 0) {
        full = cols / 16 * 16;
        for (int64_t c = 0; c < full; c += 16)
          for (int64_t p = 0; p < kc_full; p += 16)
            transpose16x16(src + c * b.col_stride + p, b.col_stride, out + p * kGemmNr + c, kGemmNr);
      }
#endif
      for (int64_t c = 0; c < kGemmNr; ++c) {
        if (c < full) {  // the k tail of a transposed column
          const float* from = src + c * b.col_stride;
          for (int64_t p = kc_full; p < kc; ++p) out[p * kGemmNr + c] = from[p * b.row_stride];
          continue;
        }
        if (c >= cols) {
          for (int64_t p = 0; p < kc; ++p) out[p * kGemmNr + c] = 0.0f;
          continue;
        }
        const float* from = src + c * b.col_stride;
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmNr + c] = from[p * b.row_stride];
      }
    }
  }
}

/// A packing buffer of at least `count` floats, 64-byte aligned, kept per thread between calls (so large buffers
/// are not faulted in again for every product).
inline float* gemm_buffer(std::vector<float>& storage, int64_t count) {
  if (static_cast<int64_t>(storage.size()) < count + 16) storage.resize(static_cast<size_t>(count + 16));
  auto address = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<float*>((address + 63) / 64 * 64);
}

/// c [m, n] (row stride ldc) = bias + a b for rows [i0, i1) and columns [j0, j1) of c, on the calling thread.
inline void gemm_block(const StridedMatrix& a, const StridedMatrix& b, const float* bias, float* c, int64_t ldc,
                       int64_t k, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
#if defined(__GNUC__) && defined(__x86_64__)
  thread_local std::vector<float> a_storage, b_storage;
  float* packed_a = gemm_buffer(a_storage, kGemmMc * kGemmKc);
  float* packed_b = gemm_buffer(b_storage, kGemmKc * kGemmNc);
  for (int64_t jc = j0; jc < j1; jc += kGemmNc) {
    const int64_t nc = std::min(kGemmNc, j1 - jc);
    for (int64_t pc = 0; pc < k; pc += kGemmKc) {
      const int64_t kc = std::min(kGemmKc, k - pc);
      gemm_pack_b(b, pc, kc, jc, nc, packed_b);
      for (int64_t ic = i0; ic < i1; ic += kGemmMc) {
        const int64_t mc = std::min(kGemmMc, i1 - ic);
        gemm_pack_a(a, ic, mc, pc, kc, packed_a);
        for (int64_t jr = 0; jr < nc; jr += kGemmNr)
          for (int64_t ir = 0; ir < mc; ir += kGemmMr)
            gemm_tile(kc, packed_a + ir * kc, packed_b + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc,
                      std::min(kGemmMr, mc - ir), std::min(kGemmNr, nc - jr), pc == 0,
                      bias ? bias + jc + jr : nullptr);
      }
    }
  }
#else
  (void)a, (void)b, (void)bias, (void)c, (void)ldc, (void)k, (void)i0, (void)i1, (void)j0, (void)j1;
  fail("gemm_block: built without the x86-64 kernels");
#endif
}

/// c [m, n] (contiguous) = bias + a [m, k] b [k, n], threaded over the longer of the result's dimensions (one
/// thread for products under ~1 MFLOP, where starting the others costs more than it saves).
inline void gemm(int64_t m, int64_t n, int64_t k, const StridedMatrix& a, const StridedMatrix& b, const float* bias,
                 float* c) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] = bias ? bias[j] : 0.0f;
    return;
  }
  const bool small = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) < 1e6;
  omp_parallel(small ? 1 : at::get_num_threads(), [&](int thread, int threads) {
    if (n >= m) {
      const auto [j0, j1] = thread_share(n, kGemmNr, thread, threads);
      if (j0 < j1) gemm_block(a, b, bias, c, n, k, 0, m, j0, j1);
    } else {
      const auto [i0, i1] = thread_share(m, kGemmMr, thread, threads);
      if (i0 < i1) gemm_block(a, b, bias, c, n, k, i0, i1, 0, n);
    }
  });
}

}  // namespace detail

/// Whether the kernels of this file take a product of these tensors (undefined ones are skipped): every one fp32,
/// strided and on the CPU, a CPU with AVX-512 F, set_decode_isa() at avx512 or above, and CPU autocast off. Unlike
/// the decoding kernels they serve autograd (through the nodes below) and any strides.
inline bool gemm_applies(std::initializer_list<const torch::Tensor*> tensors) {
  if (decode_isa() < DecodeIsa::avx512 || autocast_enabled(torch::kCPU)) return false;
  for (const auto* t : tensors) {
    if (!t->defined()) continue;
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat || t->layout() != torch::kStrided ||
        t->is_conj() || t->is_neg())
      return false;
  }
  return true;
}

/// `bias` [N] (or undefined) + `a` [M, K] `b` [K, N] on the kernels, as a new contiguous [M, N] tensor, for operands
/// of any strides (a transposed view is read in place); no autograd graph is recorded. Throws unless
/// gemm_applies() holds and the shapes agree.
inline torch::Tensor gemm_addmm(const torch::Tensor& bias, const torch::Tensor& a, const torch::Tensor& b) {
  if (!gemm_applies({&bias, &a, &b}))
    detail::fail("gemm_addmm: needs fp32 CPU tensors, AVX-512 and autocast off (see gemm_applies)");
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0) ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != b.size(1))))
    detail::fail("gemm_addmm: shapes {} x {} (bias {}) do not make a product [M, K] x [K, N] + [N]",
                 detail::format_shape(a.sizes()), detail::format_shape(b.sizes()),
                 bias.defined() ? detail::format_shape(bias.sizes()) : std::string("none"));
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  auto c = torch::empty({m, n}, a.options());
  if (m == 0 || n == 0) return c;
  auto bias_c = bias.defined() ? bias.contiguous() : torch::Tensor();
  detail::gemm(m, n, k, {a.data_ptr<float>(), a.stride(0), a.stride(1)},
               {b.data_ptr<float>(), b.stride(0), b.stride(1)}, bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
               c.data_ptr<float>());
  return c;
}

namespace detail {

/// Whether autograd records a product of these tensors: grad mode on and one of them requires a gradient.
inline bool needs_graph(std::initializer_list<const torch::Tensor*> tensors) {
  if (!torch::GradMode::is_enabled()) return false;
  return std::any_of(tensors.begin(), tensors.end(), [](const auto* t) { return t->defined() && t->requires_grad(); });
}

/// y = bias + x w (w [K, N]) with its gradients on the kernels: dx = dy w^T, dw = x^T dy, dbias = the column sums of
/// dy. With create_graph the backward takes torch's operators, so it can be differentiated again.
struct GemmAddmmFunction : torch::autograd::Function<GemmAddmmFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& bias,
                               const torch::Tensor& x, const torch::Tensor& w) {
    ctx->save_for_backward({x, w});
    return gemm_addmm(bias, x, w);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &dy = grads[0];
    const bool kernels = !torch::GradMode::is_enabled() && gemm_applies({&dy});
    torch::Tensor dbias, dx, dw;
    if (ctx->needs_input_grad(0)) dbias = dy.sum(0);
    if (ctx->needs_input_grad(1)) dx = kernels ? gemm_addmm({}, dy, w.t()) : torch::mm(dy, w.t());
    if (ctx->needs_input_grad(2)) dw = kernels ? gemm_addmm({}, x.t(), dy) : torch::mm(x.t(), dy);
    return {dbias, dx, dw};
  }
};

/// y = x e^T (e [N, K], the tied vocabulary projection) with its gradients on the kernels: dx = dy e, de = dy^T x.
struct GemmMmNtFunction : torch::autograd::Function<GemmMmNtFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& e) {
    ctx->save_for_backward({x, e});
    return gemm_addmm({}, x, e.t());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &e = saved[1], &dy = grads[0];
    const bool kernels = !torch::GradMode::is_enabled() && gemm_applies({&dy});
    torch::Tensor dx, de;
    if (ctx->needs_input_grad(0)) dx = kernels ? gemm_addmm({}, dy, e) : torch::mm(dy, e);
    if (ctx->needs_input_grad(1)) de = kernels ? gemm_addmm({}, dy.t(), x) : torch::mm(dy.t(), x);
    return {dx, de};
  }
};

}  // namespace detail

/// `bias` [N] + `x` [M, K] `w` [K, N] (Conv1D's layout), the product of GPT-2's linear layers, adapted or not: the
/// few-row decoding kernels where they apply (inference, up to small_rows_addmm_max_rows() rows), then this file's
/// kernels (with autograd), then torch::addmm.
inline torch::Tensor linear_addmm(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w) {
  if (auto y = small_rows_addmm(bias, x, w); y.defined()) return y;
  if (gemm_applies({&bias, &x, &w}) && x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) &&
      (!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(1))))
    return detail::needs_graph({&bias, &x, &w}) ? detail::GemmAddmmFunction::apply(bias, x, w)
                                                : gemm_addmm(bias, x, w);
  return torch::addmm(bias, x, w);
}

/// `x` [M, K] `e`^T with `e` [N, K], the tied vocabulary projection: the few-row decoding kernels where they apply,
/// then this file's kernels (with autograd), then torch::matmul.
inline torch::Tensor linear_mm_nt(const torch::Tensor& x, const torch::Tensor& e) {
  if (auto y = small_rows_mm_nt(x, e); y.defined()) return y;
  if (gemm_applies({&x, &e}) && x.dim() == 2 && e.dim() == 2 && x.size(1) == e.size(1))
    return detail::needs_graph({&x, &e}) ? detail::GemmMmNtFunction::apply(x, e) : gemm_addmm({}, x, e.t());
  return torch::matmul(x, e.t());
}

}  // namespace rlhf
