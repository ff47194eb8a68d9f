#pragma once
/// @file The k largest logits of each row in one AVX-512 pass, for top-k sampling on the CPU. Each decoding step of
/// a PPO rollout draws from the 10 most likely of 50257 tokens per row; LibTorch 1.13's topk took ~0.9 ms of a ~25 ms
/// step at batch 32 (GPT-2 small, two threads), one pass here takes ~0.12 ms: sixteen logits are compared at a time
/// with the row's k-th largest so far, and the few that beat it are inserted into a sorted list of k.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include <torch/torch.h>

#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>

namespace rlhf::detail {

#if defined(__GNUC__) && defined(__x86_64__)

/// The k largest of x[0 .. n) (k <= n) into values / indices, sorted descending; of equal values the lower index
/// comes first. False when the row holds a NaN (torch's topk ranks NaN above every number; the caller defers to it).
__attribute__((target("avx512f"))) inline bool top_k_row(const float* x, int64_t n, int64_t k, float* values,
                                                         int64_t* indices) {
  // Insertion into the sorted list of `filled` entries; a full list drops its last.
  int64_t filled = 0;
  const auto insert = [&](float value, int64_t index) {
    int64_t p = filled < k ? filled++ : k - 1;
    for (; p > 0 && values[p - 1] < value; --p) {
      values[p] = values[p - 1];
      indices[p] = indices[p - 1];
    }
    values[p] = value;
    indices[p] = index;
  };
  for (int64_t i = 0; i < k; ++i) {  // the first k whatever they are (so -inf entries count, as in torch)
    if (std::isnan(x[i])) return false;
    insert(x[i], i);
  }
  __mmask16 nan = 0;
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = k; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : lanes_below(n - i);
    const __m512 v = _mm512_mask_loadu_ps(neg_inf, lanes, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(values[k - 1]), _CMP_GT_OQ);
    while (above) {
      const int lane = __builtin_ctz(above);
      insert(x[i + lane], i + lane);
      // the k-th largest rose: the lanes after this one must now beat it
      const auto later = static_cast<__mmask16>(~0u << (lane + 1));
      above = later & _mm512_cmp_ps_mask(v, _mm512_set1_ps(values[k - 1]), _CMP_GT_OQ);
    }
  }
  return nan == 0;
}

#endif

/// {values [N, k] fp32, indices [N, k] int64}: the k largest entries of each row of `x` [N, V] (fp32, contiguous, on
/// a CPU with AVX-512), sorted descending, as torch's topk(k, -1, largest, sorted) gives them (of equal values the
/// lower index first, where torch leaves their order open). Empty when the kernels do not apply or a row holds a NaN:
/// the caller then uses torch's topk.
inline std::optional<std::pair<torch::Tensor, torch::Tensor>> top_k_rows(const torch::Tensor& x, int64_t k) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (!avx512_kernels_apply(x) || x.scalar_type() != torch::kFloat || x.dim() != 2 || !x.is_contiguous() || k < 1 ||
      k > x.size(1))
    return std::nullopt;
  const int64_t rows = x.size(0), n = x.size(1);
  auto values = torch::empty({rows, k}, x.options());
  auto indices = torch::empty({rows, k}, x.options().dtype(torch::kLong));
  const float* in = x.data_ptr<float>();
  float* v = values.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  std::atomic<bool> ok{true};
  omp_parallel(rows * n >= (int64_t{1} << 20) ? at::get_num_threads() : 1, [&](int thread, int threads) {
    const auto [r0, r1] = thread_share(rows, 1, thread, threads);
    for (int64_t r = r0; r < r1; ++r)
      if (!top_k_row(in + r * n, n, k, v + r * k, idx + r * k)) ok = false;
  });
  if (!ok) return std::nullopt;
  return std::make_pair(values, indices);
#else
  (void)x, (void)k;
  return std::nullopt;
#endif
}

}  // namespace rlhf::detail
