#pragma once
/// @file Attention of one decoding step on the CPU, fused. A decoding step has one query per row; torch's operators
/// would compute it as broadcast products (q * k, then probs * v), each writing and reading a [B, H, S, Dh]
/// temporary, plus a softmax and half a dozen casts and reductions: at batch 32 with 66 positions, 2-3 ms per step
/// across GPT-2 small's 12 layers, as much as the layers' matrix products in bf16. decode_attention() reads each
/// head's cached keys and values once and writes only the [B, H, 1, Dh] result.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <torch/torch.h>

#include <rlhf/core/small_matmul.hpp>

namespace rlhf {

namespace detail {

#if defined(__GNUC__) && defined(__x86_64__)

/// 8 floats from fp32 or bf16 memory.
__attribute__((target("avx2,fma"))) inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8f(const c10::BFloat16* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));  // bf16 = the high half of fp32
}

/// One head of one row: out = softmax(scale * q k^T + bias) v over `positions` cached positions; q [dh], k and v
/// rows of dh at strides `k_stride` and `v_stride`, bias [positions]; `scores` holds `positions` floats and `acc` dh.
template <class Q, class KV>
__attribute__((target("avx2,fma"))) inline void attend_one(const Q* q, const KV* k, int64_t k_stride, const KV* v,
                                                           int64_t v_stride, const float* bias, int64_t positions,
                                                           int64_t dh, float scale, float* scores, float* acc,
                                                           KV* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < positions; ++s) {
    const KV* ks = k + s * k_stride;
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < dh; d += 8) dot = _mm256_fmadd_ps(load8f(q + d), load8f(ks + d), dot);
    scores[s] = sum_lanes(dot) * scale + bias[s];
    top = std::max(top, scores[s]);
  }
  float total = 0;
  for (int64_t s = 0; s < positions; ++s) total += scores[s] = std::exp(scores[s] - top);
  for (int64_t d = 0; d < dh; d += 8) _mm256_storeu_ps(acc + d, _mm256_setzero_ps());
  for (int64_t s = 0; s < positions; ++s) {
    const __m256 p = _mm256_set1_ps(scores[s] / total);
    const KV* vs = v + s * v_stride;
    for (int64_t d = 0; d < dh; d += 8)
      _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p, load8f(vs + d), _mm256_loadu_ps(acc + d)));
  }
  for (int64_t d = 0; d < dh; ++d) out[d] = static_cast<KV>(acc[d]);  // bf16: rounded to nearest even
}

/// decode_attention() for one combination of dtypes (q: Q; k, v and the result: KV).
template <class Q, class KV>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& bias,
                float scale, torch::Tensor& out) {
  const int64_t b = q.size(0), h = q.size(1), dh = q.size(3), positions = k.size(2);
  const Q* qp = q.data_ptr<Q>();
  const KV *kp = k.data_ptr<KV>(), *vp = v.data_ptr<KV>();
  const float* bp = bias.data_ptr<float>();
  KV* op = out.data_ptr<KV>();  // [B, 1, H, Dh]
  omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [begin, end] = thread_share(b * h, 1, thread, threads);
    std::vector<float> scores(positions), acc(dh);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / h, head = i % h;
      attend_one(qp + row * q.stride(0) + head * q.stride(1), kp + row * k.stride(0) + head * k.stride(1),
                 k.stride(2), vp + row * v.stride(0) + head * v.stride(1), v.stride(2), bp + row * positions,
                 positions, dh, scale, scores.data(), acc.data(), op + i * dh);
    }
  });
}

#endif

}  // namespace detail

/// softmax(scale * q k^T + bias) v for one query per row (a decoding step), fused: q [B, H, 1, Dh], k and v
/// [B, H, S, Dh] (the KV cache's views: each position's Dh contiguous), bias [B, 1, 1, S] fp32 (0, or -inf for a
/// position the query must not see; at least one finite per row). q, k and v in fp32 or bf16 (k and v alike); sums
/// and the softmax in fp32. Returns [B, H, 1, Dh] in v's dtype (a view of a [B, 1, H, Dh] tensor, so the heads'
/// concatenation that follows is free); equal to torch's operators up to float summation order. Undefined (use
/// torch's operators) unless the decode kernels are on (set_decode_kernels()) and the CPU has AVX2 and FMA, every
/// tensor is on the CPU, Dh is a multiple of 8, and no autograd graph is needed.
inline torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& bias, double scale) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (decode_isa() < DecodeIsa::avx2 || q.dim() != 4 || k.dim() != 4 || v.sizes() != k.sizes() || q.size(2) != 1 ||
      q.size(0) != k.size(0) || q.size(1) != k.size(1) || q.size(3) != k.size(3) || q.size(3) % 8 != 0 ||
      bias.dim() != 4 || bias.size(0) != q.size(0) || bias.size(1) != 1 || bias.size(2) != 1 ||
      bias.size(3) != k.size(2) || bias.scalar_type() != torch::kFloat || !bias.is_contiguous())
    return {};
  const auto kv_dtype = k.scalar_type();
  for (const auto* t : {&q, &k, &v}) {
    const auto dtype = t->scalar_type();
    if (!t->device().is_cpu() || t->layout() != torch::kStrided || t->stride(3) != 1 ||
        (dtype != torch::kFloat && dtype != torch::kBFloat16) || (t != &q && dtype != kv_dtype) ||
        (torch::GradMode::is_enabled() && t->requires_grad()))
      return {};
  }
  if (!bias.device().is_cpu()) return {};
  auto out = torch::empty({q.size(0), 1, q.size(1), q.size(3)}, v.options());
  const auto f = static_cast<float>(scale);
  const bool q16 = q.scalar_type() == torch::kBFloat16, kv16 = kv_dtype == torch::kBFloat16;
  if (q16 && kv16)
    detail::attend_all<c10::BFloat16, c10::BFloat16>(q, k, v, bias, f, out);
  else if (q16)
    detail::attend_all<c10::BFloat16, float>(q, k, v, bias, f, out);
  else if (kv16)
    detail::attend_all<float, c10::BFloat16>(q, k, v, bias, f, out);
  else
    detail::attend_all<float, float>(q, k, v, bias, f, out);
  return out.permute({0, 2, 1, 3});
#else
  return {};
#endif
}

}  // namespace rlhf
