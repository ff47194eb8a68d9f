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

#include <rlhf/core/simd512.hpp>
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

// Loops bound by template parameters, unrolled so that their vectors live in registers (see small_matmul.hpp).
#define RLHF_ATTEND_UNROLL _Pragma("GCC unroll 16")

/// 16 floats from fp32 or bf16 memory.
RLHF_AVX512_TARGET inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
RLHF_AVX512_TARGET inline __m512 load16f(const c10::BFloat16* p) {
  return load_part(reinterpret_cast<const uint16_t*>(p), 16);
}

/// 16 floats stored as fp32, or rounded to bf16 (to nearest even).
RLHF_AVX512_TARGET inline void store16f(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
RLHF_AVX512_TARGET inline void store16f(c10::BFloat16* p, __m512 v) {
  store_bf16x16(reinterpret_cast<uint16_t*>(p), v);
}

/// [a0 + a1, a2 + a3, b0 + b1, b2 + b3] of the 128-bit lanes of a and b.
RLHF_AVX512_TARGET inline __m512 fold_lanes(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all16, a, b, 0x88), _mm512_maskz_shuffle_f32x4(all16, a, b, 0xDD));
}

/// The lane sums of 16 vectors as one vector (lane i: the sum of v[i]'s lanes), by a transposing tree of 15
/// additions where 16 horizontal sums would take 64. (The zero-masked forms of the shuffles: see simd512.hpp.)
RLHF_AVX512_TARGET inline __m512 sum_lanes16(const __m512 (&v)[16]) {
  __m512 pairs[8], quads[4];
  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of v[2i] = a, v[2i + 1] = b
  RLHF_ATTEND_UNROLL for (int i = 0; i < 8; ++i) pairs[i] =
      _mm512_add_ps(_mm512_maskz_unpacklo_ps(all16, v[2 * i], v[2 * i + 1]),
                    _mm512_maskz_unpackhi_ps(all16, v[2 * i], v[2 * i + 1]));
  // per 128-bit lane: the lane's sums of four vectors, in order
  RLHF_ATTEND_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, a, b)),
                             _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, a, b)));
  }
  // the four 128-bit lanes added: quads[0..1] into the two halves of one vector, quads[2..3] of another, then both
  return fold_lanes(fold_lanes(quads[0], quads[1]), fold_lanes(quads[2], quads[3]));
}

/// attend_one() with AVX-512 for dh = 16 C: the scores of 16 positions at a time, their exponentials 16 at a time,
/// and the weighted sum in 2 C registers; `scores` holds `positions` rounded up to 16 floats.
template <int C, class Q, class KV>
RLHF_AVX512_TARGET inline void attend_one512(const Q* q, const KV* k, int64_t k_stride, const KV* v, int64_t v_stride,
                                             const float* bias, int64_t positions, float scale, float* scores,
                                             KV* out) {
  __m512 qv[C];
  RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c) qv[c] = load16f(q + 16 * c);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = minus_inf;
  for (int64_t s0 = 0; s0 < positions; s0 += 16) {
    const int64_t count = std::min<int64_t>(16, positions - s0);
    __m512 dots[16];
    RLHF_ATTEND_UNROLL for (int j = 0; j < 16; ++j) {
      dots[j] = _mm512_setzero_ps();
      if (j >= count) continue;
      const KV* ks = k + (s0 + j) * k_stride;
      RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c) dots[j] = _mm512_fmadd_ps(qv[c], load16f(ks + 16 * c), dots[j]);
    }
    // lanes past the positions: -inf, so that they weigh 0
    const __m512 row = _mm512_fmadd_ps(sum_lanes16(dots), _mm512_set1_ps(scale), load_part(bias + s0, count));
    const __m512 score = _mm512_mask_mov_ps(minus_inf, lanes_below(count), row);
    _mm512_storeu_ps(scores + s0, score);
    top = _mm512_maskz_max_ps(all16, top, score);
  }
  // the row's largest score in every lane
  top = _mm512_maskz_max_ps(all16, top, _mm512_maskz_shuffle_f32x4(all16, top, top, 0x4E));
  top = _mm512_maskz_max_ps(all16, top, _mm512_maskz_shuffle_f32x4(all16, top, top, 0xB1));
  top = _mm512_maskz_max_ps(all16, top, _mm512_maskz_permute_ps(all16, top, 0x4E));
  top = _mm512_maskz_max_ps(all16, top, _mm512_maskz_permute_ps(all16, top, 0xB1));
  __m512 sums = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < positions; s0 += 16) {
    const __m512 score = _mm512_loadu_ps(scores + s0);
    // exp_nonpositive() gives no exact 0; a hidden position (-inf) weighs exactly 0
    const __mmask16 seen = _mm512_cmp_ps_mask(score, minus_inf, _CMP_NEQ_OQ);
    const __m512 weight = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(score, top)));
    _mm512_storeu_ps(scores + s0, weight);
    sums = _mm512_add_ps(sums, weight);
  }
  // two sets of sums, for even and odd positions, so that the additions' latency is hidden
  __m512 even[C], odd[C];
  RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c) even[c] = odd[c] = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 1 < positions; s += 2) {
    const __m512 we = _mm512_set1_ps(scores[s]), wo = _mm512_set1_ps(scores[s + 1]);
    const KV *ve = v + s * v_stride, *vo = ve + v_stride;
    RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c) {
      even[c] = _mm512_fmadd_ps(we, load16f(ve + 16 * c), even[c]);
      odd[c] = _mm512_fmadd_ps(wo, load16f(vo + 16 * c), odd[c]);
    }
  }
  if (s < positions) {
    const __m512 we = _mm512_set1_ps(scores[s]);
    const KV* ve = v + s * v_stride;
    RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c) even[c] = _mm512_fmadd_ps(we, load16f(ve + 16 * c), even[c]);
  }
  const __m512 norm = _mm512_set1_ps(1.0f / sum_lanes512(sums));
  RLHF_ATTEND_UNROLL for (int c = 0; c < C; ++c)
    store16f(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), norm));
}

/// The largest head width attend_one512() takes, in 16s.
inline constexpr int64_t kAttend512Chunks = 8;

/// attend_one512<C> for C = dh / 16, chosen at run time among 1 .. kAttend512Chunks.
template <class Q, class KV, int C = 1>
inline void attend_one512_for(int64_t chunks, const Q* q, const KV* k, int64_t k_stride, const KV* v,
                              int64_t v_stride, const float* bias, int64_t positions, float scale, float* scores,
                              KV* out) {
  if constexpr (C <= kAttend512Chunks) {
    if (chunks != C)
      return attend_one512_for<Q, KV, C + 1>(chunks, q, k, k_stride, v, v_stride, bias, positions, scale, scores,
                                             out);
    attend_one512<C>(q, k, k_stride, v, v_stride, bias, positions, scale, scores, out);
  }
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
  const bool wide = avx512_supported() && decode_isa() >= DecodeIsa::avx512 && dh % 16 == 0 &&
                    dh / 16 <= kAttend512Chunks;
  omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [begin, end] = thread_share(b * h, 1, thread, threads);
    std::vector<float> scores((positions + 15) / 16 * 16), acc(dh);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / h, head = i % h;
      const Q* qi = qp + row * q.stride(0) + head * q.stride(1);
      const KV *ki = kp + row * k.stride(0) + head * k.stride(1), *vi = vp + row * v.stride(0) + head * v.stride(1);
      if (wide)
        attend_one512_for(dh / 16, qi, ki, k.stride(2), vi, v.stride(2), bp + row * positions, positions, scale,
                          scores.data(), op + i * dh);
      else
        attend_one(qi, ki, k.stride(2), vi, v.stride(2), bp + row * positions, positions, dh, scale, scores.data(),
                   acc.data(), op + i * dh);
    }
  });
}

#undef RLHF_ATTEND_UNROLL

#endif

}  // namespace detail

/// softmax(scale * q k^T + bias) v for one query per row (a decoding step), fused: q [B, H, 1, Dh], k and v
/// [B, H, S, Dh] (the KV cache's views: each position's Dh contiguous), bias [B, 1, 1, S] fp32 (0, or -inf for a
/// position the query must not see; at least one finite per row). q, k and v in fp32 or bf16 (k and v alike); sums
/// and the softmax in fp32. Returns [B, H, 1, Dh] in v's dtype (a view of a [B, 1, H, Dh] tensor, so the heads'
/// concatenation that follows is free); equal to torch's operators up to float summation order and the
/// exponential's last bit. Undefined (use torch's operators) unless the decode kernels are on (set_decode_kernels())
/// and the CPU has AVX2 and FMA, every tensor is on the CPU, Dh is a multiple of 8, and no autograd graph is needed.
/// With AVX-512 (and set_decode_isa() not below DecodeIsa::avx512) a Dh that is a multiple of 16, up to 128, takes
/// 16 positions at a time; other widths, 8 lanes at a time.
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
