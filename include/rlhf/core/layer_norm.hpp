#pragma once
/// @file Layernorm over the last dimension of fp32 rows in AVX-512, forward and backward. LibTorch 1.13's CPU
/// layer_norm took ~55 us on a decoding step's [32, 768] rows (~70 ms of a bf16 PPO phase's rollout, 25 layernorms a
/// step), and 0.32 ms forward + backward on a learning update's [528, 768] rows (0.16 ms here; ~30 ms of the bf16
/// phase's 8 updates); here each row takes three passes from L1 (sum, squared deviations, output) forward and two
/// backward, the weight's and bias's gradients summed per thread.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>

namespace rlhf {

namespace detail {

#if defined(__GNUC__) && defined(__x86_64__)

/// Rows [r0, r1) of y = (x - mean) / sqrt(var + eps) * w + b over rows of length `d` (the biased variance, as
/// torch's layer_norm), written as torch writes it: (x rstd - mean rstd) w + b; each row's mean and rstd also into
/// `means` and `rstds` when given.
RLHF_AVX512_TARGET inline void layer_norm_rows_kernel(const float* x, const float* w, const float* b, float* y,
                                                      int64_t d, float eps, int64_t r0, int64_t r1,
                                                      float* means = nullptr, float* rstds = nullptr) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * d;
    float* out = y + r * d;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) sum = _mm512_add_ps(sum, load_part(row + i, std::min<int64_t>(16, d - i)));
    const float mean = sum_lanes512(sum) / static_cast<float>(d);
    const __m512 mean_v = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const int64_t count = std::min<int64_t>(16, d - i);
      const __m512 dev = _mm512_maskz_sub_ps(lanes_below(count), load_part(row + i, count), mean_v);
      squares = _mm512_fmadd_ps(dev, dev, squares);
    }
    const float rstd = 1.0f / std::sqrt(sum_lanes512(squares) / static_cast<float>(d) + eps);
    if (means) means[r] = mean, rstds[r] = rstd;
    const __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-rstd * mean);
    for (int64_t i = 0; i < d; i += 16) {
      const int64_t count = std::min<int64_t>(16, d - i);
      const __m512 normed = _mm512_fmadd_ps(load_part(row + i, count), scale, shift);
      store_part(out + i, _mm512_fmadd_ps(normed, load_part(w + i, count), load_part(b + i, count)), count);
    }
  }
}

/// Rows [r0, r1) of the layernorm's backward for rows of length `d`: dx = rstd (g - mean(g) - xhat mean(g xhat)) with
/// g = dy w and xhat = (x - mean) rstd; sum_r dy xhat added to `dw` and sum_r dy to `db` when they are given.
RLHF_AVX512_TARGET inline void layer_norm_backward_rows_kernel(const float* x, const float* dy, const float* w,
                                                               const float* means, const float* rstds, float* dx,
                                                               float* dw, float* db, int64_t d, int64_t r0,
                                                               int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    const __m512 mean = _mm512_set1_ps(means[r]), rstd = _mm512_set1_ps(rstds[r]);
    __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {  // past d the loads are 0, so g is 0 and adds nothing
      const int64_t count = std::min<int64_t>(16, d - i);
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load_part(xr + i, count), mean), rstd);
      const __m512 g = _mm512_mul_ps(load_part(gr + i, count), load_part(w + i, count));
      sum_g = _mm512_add_ps(sum_g, g);
      sum_gx = _mm512_fmadd_ps(g, xhat, sum_gx);
    }
    const __m512 a = _mm512_set1_ps(sum_lanes512(sum_g) / static_cast<float>(d));
    const __m512 c = _mm512_set1_ps(sum_lanes512(sum_gx) / static_cast<float>(d));
    float* out = dx + r * d;
    for (int64_t i = 0; i < d; i += 16) {
      const int64_t count = std::min<int64_t>(16, d - i);
      const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load_part(xr + i, count), mean), rstd);
      const __m512 grad = load_part(gr + i, count);
      const __m512 g = _mm512_mul_ps(grad, load_part(w + i, count));
      store_part(out + i, _mm512_mul_ps(rstd, _mm512_sub_ps(_mm512_sub_ps(g, a), _mm512_mul_ps(xhat, c))), count);
      if (dw) store_part(dw + i, _mm512_fmadd_ps(grad, xhat, load_part(dw + i, count)), count);
      if (db) store_part(db + i, _mm512_add_ps(grad, load_part(db + i, count)), count);
    }
  }
}

#endif

/// Whether the kernels take a layernorm of `x` [..., D] with `weight` and `bias` [D]: fp32 CPU tensors (x
/// contiguous, with at least one dimension; weight and bias contiguous [D]) and the AVX-512 kernels available.
inline bool layer_norm_kernels_apply(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (x.dim() == 0 || !avx512_kernels_apply(x) || x.scalar_type() != torch::kFloat || !x.is_contiguous())
    return false;
  const int64_t d = x.size(-1);
  for (const auto* t : {&weight, &bias})
    if (!t->defined() || t->dim() != 1 || t->size(0) != d || !t->device().is_cpu() ||
        t->scalar_type() != torch::kFloat || !t->is_contiguous())
      return false;
  return true;
}

/// y = layer_norm(x) on the kernel, and each row's mean and rstd when `means` is given ([rows] fp32 each).
inline torch::Tensor layer_norm_forward(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                        double eps, torch::Tensor* means = nullptr, torch::Tensor* rstds = nullptr) {
  auto y = torch::empty_like(x);
  const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
  if (means) *means = torch::empty({rows}, x.options()), *rstds = torch::empty({rows}, x.options());
#if defined(__GNUC__) && defined(__x86_64__)
  if (rows == 0) return y;
  const int threads = x.numel() >= (int64_t{1} << 15) ? at::get_num_threads() : 1;
  omp_parallel(threads, [&](int thread, int count) {
    const auto [r0, r1] = thread_share(rows, 1, thread, count);
    if (r0 < r1)
      layer_norm_rows_kernel(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                             y.data_ptr<float>(), d, static_cast<float>(eps), r0, r1,
                             means ? means->data_ptr<float>() : nullptr, rstds ? rstds->data_ptr<float>() : nullptr);
  });
#else
  (void)weight, (void)bias, (void)eps;
  fail("layer_norm_forward: built without the x86-64 kernels");
#endif
  return y;
}

/// The layernorm as an autograd node on the kernels: the forward keeps x and each row's mean and rstd (as torch's
/// does), the backward computes dx, dweight and dbias in one pass per row. With create_graph the backward takes
/// torch's operators on the same formula, so it can be differentiated again.
struct LayerNormNode : torch::autograd::Function<LayerNormNode> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias, double eps) {
    torch::Tensor means, rstds;
    auto y = layer_norm_forward(x, weight, bias, eps, &means, &rstds);
    ctx->save_for_backward({x, weight, means, rstds});
    ctx->saved_data["eps"] = eps;
    return y;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1];
    const int64_t d = x.size(-1), rows = d > 0 ? x.numel() / d : 0;
    auto dy = grads[0].to(torch::kFloat).contiguous();
    const bool want_w = ctx->needs_input_grad(1), want_b = ctx->needs_input_grad(2);
    if (torch::GradMode::is_enabled()) {
      // double backward: the same formula in torch's operators, the statistics recomputed from x so that their
      // dependence on it is differentiated too
      auto rows_x = x.reshape({rows, d});
      auto centred = rows_x - rows_x.mean(1, true);
      auto rstd = (centred.pow(2).mean(1, true) + ctx->saved_data["eps"].toDouble()).rsqrt();
      auto xhat = centred * rstd;
      auto g = dy.reshape({rows, d}) * weight;
      auto dx = rstd * (g - g.mean(1, true) - xhat * (g * xhat).mean(1, true));
      return {dx.view(x.sizes()), want_w ? (dy.reshape({rows, d}) * xhat).sum(0) : torch::Tensor(),
              want_b ? dy.reshape({rows, d}).sum(0) : torch::Tensor(), torch::Tensor()};
    }
    auto dx = torch::empty_like(x);
    const int threads = x.numel() >= (int64_t{1} << 15) ? at::get_num_threads() : 1;
    // Per thread: the weight's and the bias's gradient sums over its rows, added up after.
    auto partial = torch::zeros({threads, 2, d}, x.options());
#if defined(__GNUC__) && defined(__x86_64__)
    if (rows > 0)
      omp_parallel(threads, [&](int thread, int count) {
        const auto [r0, r1] = thread_share(rows, 1, thread, count);
        float* sums = partial.data_ptr<float>() + thread * 2 * d;
        if (r0 < r1)
          layer_norm_backward_rows_kernel(x.data_ptr<float>(), dy.data_ptr<float>(), weight.data_ptr<float>(),
                                          saved[2].data_ptr<float>(), saved[3].data_ptr<float>(),
                                          dx.data_ptr<float>(), want_w ? sums : nullptr,
                                          want_b ? sums + d : nullptr, d, r0, r1);
      });
#endif
    auto totals = partial.sum(0);  // [2, D]
    return {dx, want_w ? totals[0] : torch::Tensor(), want_b ? totals[1] : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace detail

/// layer_norm(x, [D], weight, bias, eps) for an fp32 CPU `x` [..., D] on the AVX-512 kernels, weight and bias fp32
/// [D]: without a graph to record (inference mode or no_grad, or nothing requires a gradient) the forward kernel,
/// with one an autograd node whose backward runs on a kernel too (detail::LayerNormNode); an undefined tensor where
/// the kernels do not apply (use torch::layer_norm then). Equal to torch's up to float rounding (~1e-6 relative).
inline torch::Tensor layer_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                     double eps) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (!detail::layer_norm_kernels_apply(x, weight, bias)) return {};
  if (torch::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad()))
    return detail::LayerNormNode::apply(x, weight, bias, eps);
  return detail::layer_norm_forward(x, weight, bias, eps);
#else
  return {};
#endif
}

}  // namespace rlhf
