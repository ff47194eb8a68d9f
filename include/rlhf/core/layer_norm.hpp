#pragma once
/// @file Layernorm over the last dimension of fp32 rows in AVX-512, for forwards that record no autograd graph
/// (sampling, the reference model's forward). LibTorch 1.13's CPU layer_norm took ~55 us on a decoding step's
/// [32, 768] rows (~70 ms of a bf16 PPO phase's rollout, 25 layernorms a step); here each row takes three passes
/// from L1 (sum, squared deviations, output), a few microseconds per call.

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
/// torch's layer_norm), written as torch writes it: (x rstd - mean rstd) w + b.
RLHF_AVX512_TARGET inline void layer_norm_rows_kernel(const float* x, const float* w, const float* b, float* y,
                                                      int64_t d, float eps, int64_t r0, int64_t r1) {
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
    const __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-rstd * mean);
    for (int64_t i = 0; i < d; i += 16) {
      const int64_t count = std::min<int64_t>(16, d - i);
      const __m512 normed = _mm512_fmadd_ps(load_part(row + i, count), scale, shift);
      store_part(out + i, _mm512_fmadd_ps(normed, load_part(w + i, count), load_part(b + i, count)), count);
    }
  }
}

#endif

}  // namespace detail

/// layer_norm(x, [D], weight, bias, eps) for an fp32 CPU `x` [..., D] on the AVX-512 kernel, when no autograd graph
/// is needed (inference mode or no_grad, or nothing requires a gradient) and weight and bias are fp32 [D]; an
/// undefined tensor otherwise (use torch::layer_norm then). Equal to torch's up to float rounding (~1e-6 relative).
inline torch::Tensor layer_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                     double eps) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() == 0 || !detail::avx512_kernels_apply(x) || x.scalar_type() != torch::kFloat || !x.is_contiguous())
    return {};
  const int64_t d = x.size(-1);
  for (const auto* t : {&weight, &bias})
    if (!t->defined() || t->dim() != 1 || t->size(0) != d || !t->device().is_cpu() ||
        t->scalar_type() != torch::kFloat || !t->is_contiguous())
      return {};
  if (torch::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad()))
    return {};
  auto y = torch::empty_like(x);
  const int64_t rows = d > 0 ? x.numel() / d : 0;
  if (rows == 0) return y;
  const int threads = x.numel() >= (int64_t{1} << 15) ? at::get_num_threads() : 1;
  detail::omp_parallel(threads, [&](int thread, int count) {
    const auto [r0, r1] = detail::thread_share(rows, 1, thread, count);
    if (r0 < r1)
      detail::layer_norm_rows_kernel(x.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(),
                                     y.data_ptr<float>(), d, static_cast<float>(eps), r0, r1);
  });
  return y;
#else
  return {};
#endif
}

}  // namespace rlhf
