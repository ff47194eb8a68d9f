#pragma once
/// @file The softmax statistics of PPO's token terms in AVX-512, for fp32 and bf16 logits on the CPU. Per row of
/// logits z (and of the reference's, zr), both divided by the sampling temperature: log p(token), the entropy of p,
/// KL(p || q) and the two log-sum-exps, in two passes over the row (its maximum, then the exponentials and their
/// weighted sums); and the closed-form gradient of a weighted sum of the three statistics in one pass. Composed of
/// torch's operators the same work takes a dozen passes over [rows, V] fp32 tensors: for a GPT-2 minibatch of 400
/// positions with reference logits, 100-129 ms forward and 118-141 ms backward, against 7-8 ms each here (fp32
/// logits; bf16 ones 4-6 ms).
///
/// Conventions, as in ppo_math::fused_chunk: entries of zero probability (logit -inf, or an exponential below
/// e^-87) count as 0 in the entropy and the KL and get gradient 0; a row with a NaN gives NaN statistics and a NaN
/// gradient row.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <torch/torch.h>

#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf::detail {

/// Per-row statistics [N] (fp32) of softmax_stats_forward.
struct SoftmaxRowStats {
  torch::Tensor logprob;  ///< log p(token)
  torch::Tensor entropy;  ///< -sum_v p_v log p_v
  torch::Tensor kl;       ///< sum_v p_v (log p_v - log q_v); zeros without reference logits
  torch::Tensor lse;      ///< logsumexp(z)
  torch::Tensor ref_lse;  ///< logsumexp(zr); zeros without reference logits
  torch::Tensor ref_logprob;  ///< log q(token) (token_stats_rows); undefined without reference logits
};

/// Whether softmax_stats_forward / _backward take these operands: fp32 or bf16 logits [N, V] on a CPU with AVX-512
/// (avx512_kernels_apply), contiguous, and reference logits either undefined or empty, or of the same dtype and
/// shape, contiguous.
inline bool softmax_stats_kernels_apply(const torch::Tensor& logits, const torch::Tensor& ref_logits) {
  if (!avx512_kernels_apply(logits) || logits.dim() != 2 || !logits.is_contiguous() || logits.size(1) == 0)
    return false;
  return !ref_logits.defined() || ref_logits.numel() == 0 || (ref_logits.scalar_type() == logits.scalar_type() &&
                                     ref_logits.sizes() == logits.sizes() && ref_logits.is_contiguous() &&
                                     ref_logits.device() == logits.device());
}

#if defined(__GNUC__) && defined(__x86_64__)

/// One element as a float.
inline float element_value(const float* p) { return *p; }
inline float element_value(const uint16_t* p) {
  const uint32_t bits = uint32_t{*p} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// One float stored as an element (bf16: rounded to nearest even, as store_part does).
RLHF_AVX512_TARGET inline void store_element(float* p, float v) { *p = v; }
RLHF_AVX512_TARGET inline void store_element(uint16_t* p, float v) { store_part(p, _mm512_set1_ps(v), 1); }

/// The largest of x[0 .. V), NaN when one is NaN.
template <class T>
RLHF_AVX512_TARGET inline float row_max(const T* x, int64_t V) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = lowest, m1 = lowest;
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 32 <= V; i += 32) {
    const __m512 a = load_part(x + i, 16), b = load_part(x + i + 16, 16);
    nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
    m0 = _mm512_maskz_max_ps(all16, m0, a);
    m1 = _mm512_maskz_max_ps(all16, m1, b);
  }
  for (; i < V; i += 16) {
    const int64_t count = std::min<int64_t>(16, V - i);
    const __m512 a = _mm512_mask_blend_ps(lanes_below(count), lowest, load_part(x + i, count));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m0 = _mm512_maskz_max_ps(all16, m0, a);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return lanes_max(_mm512_maskz_max_ps(all16, m0, m1));
}

/// The statistics of rows [r0, r1) of x [N, V] (and ref, null without reference logits), z = x * inv_t.
template <class T>
RLHF_AVX512_TARGET void softmax_stats_rows(const T* x, const T* ref, const int64_t* tokens, int64_t V, float inv_t,
                                           int64_t r0, int64_t r1, float* logprob, float* entropy, float* kl,
                                           float* lse, float* ref_lse) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const __m512 vinv = _mm512_set1_ps(inv_t);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * V;
    const float m = row_max(xr, V) * inv_t;
    if (std::isnan(m)) {
      logprob[r] = entropy[r] = kl[r] = lse[r] = ref_lse[r] = nan;
      continue;
    }
    const T* qr = ref ? ref + r * V : nullptr;
    const float mq = qr ? row_max(qr, V) * inv_t : 0.0f;
    const bool ref_nan = std::isnan(mq);  // only the KL and the reference's log-sum-exp are NaN then
    if (ref_nan) qr = nullptr;
    const __m512 vm = _mm512_set1_ps(m), vmq = _mm512_set1_ps(mq);
    // s = sum e, a = sum e d, with e = exp(d), d = z - m; for the reference sq = sum exp(dq), c = sum e (d - dq)
    __m512 s = _mm512_setzero_ps(), a = _mm512_setzero_ps(), sq = _mm512_setzero_ps(), c = _mm512_setzero_ps();
    for (int64_t i = 0; i < V; i += 16) {
      const int64_t count = std::min<int64_t>(16, V - i);
      const __m512 d = _mm512_fmsub_ps(load_part(xr + i, count), vinv, vm);
      const __mmask16 live = live_lanes(d, count);
      const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(d));
      s = _mm512_add_ps(s, e);
      a = _mm512_mask3_fmadd_ps(e, d, a, live);
      if (qr) {
        const __m512 dq = _mm512_fmsub_ps(load_part(qr + i, count), vinv, vmq);
        sq = _mm512_add_ps(sq, _mm512_maskz_mov_ps(live_lanes(dq, count), exp_nonpositive(dq)));
        c = _mm512_mask3_fmadd_ps(e, _mm512_sub_ps(d, dq), c, live);
      }
    }
    const float sum = sum_lanes512(s), log_s = std::log(sum), mean_d = sum_lanes512(a) / sum;
    lse[r] = m + log_s;
    entropy[r] = log_s - mean_d;
    logprob[r] = element_value(xr + tokens[r]) * inv_t - lse[r];
    if (ref_nan) {
      ref_lse[r] = kl[r] = nan;
    } else if (qr) {
      const float log_sq = std::log(sum_lanes512(sq));
      ref_lse[r] = mq + log_sq;
      kl[r] = sum_lanes512(c) / sum - log_s + log_sq;  // sum p (log p - log q)
    } else {
      ref_lse[r] = kl[r] = 0.0f;
    }
  }
}

/// The gradient, rows [r0, r1) of out [N, V], of sum_r g_lp[r] log p(token_r) + g_ent[r] H_r + g_kl[r] KL_r with
/// respect to x: p (c0 + (g_kl - g_ent) log p - g_kl log q) + g_lp onehot(token), times inv_t, where
/// c0 = -g_lp - g_ent H - g_kl KL (H, KL, lse and ref_lse from softmax_stats_rows).
template <class T>
RLHF_AVX512_TARGET void softmax_stats_grad_rows(const T* x, const T* ref, const int64_t* tokens, int64_t V,
                                                float inv_t, const float* g_lp, const float* g_ent,
                                                const float* g_kl, const float* entropy, const float* kl,
                                                const float* lse, const float* ref_lse, T* out, int64_t r0,
                                                int64_t r1) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const __m512 vinv = _mm512_set1_ps(inv_t);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * V;
    T* o = out + r * V;
    const bool with_ref = ref && g_kl[r] != 0.0f;
    const T* qr = with_ref ? ref + r * V : nullptr;
    if (std::isnan(lse[r]) || (with_ref && std::isnan(ref_lse[r]))) {
      for (int64_t i = 0; i < V; i += 16) store_part(o + i, _mm512_set1_ps(nan), std::min<int64_t>(16, V - i));
      continue;
    }
    // The taken token's logits, read before the row is written (out may be x).
    const int64_t t = tokens[r];
    const float x_t = element_value(xr + t), q_t = qr ? element_value(qr + t) : 0.0f;
    const float c0 = -g_lp[r] - g_ent[r] * entropy[r] - (with_ref ? g_kl[r] * kl[r] : 0.0f);
    const float cp = (with_ref ? g_kl[r] : 0.0f) - g_ent[r], cq = with_ref ? -g_kl[r] : 0.0f;
    const __m512 vlse = _mm512_set1_ps(lse[r]), vlseq = _mm512_set1_ps(qr ? ref_lse[r] : 0.0f);
    const __m512 vc0 = _mm512_set1_ps(c0), vcp = _mm512_set1_ps(cp), vcq = _mm512_set1_ps(cq);
    for (int64_t i = 0; i < V; i += 16) {
      const int64_t count = std::min<int64_t>(16, V - i);
      const __m512 logp = _mm512_fmsub_ps(load_part(xr + i, count), vinv, vlse);
      const __mmask16 live = live_lanes(logp, count);
      __m512 coef = _mm512_fmadd_ps(vcp, logp, vc0);
      if (qr) coef = _mm512_fmadd_ps(vcq, _mm512_fmsub_ps(load_part(qr + i, count), vinv, vlseq), coef);
      const __m512 g = _mm512_maskz_mul_ps(live, exp_nonpositive(logp), coef);
      store_part(o + i, _mm512_mul_ps(g, vinv), count);
    }
    // The taken token's element again, with g_lp added before the (bf16) rounding.
    const float logp = x_t * inv_t - lse[r];
    float coef = c0 + cp * logp;
    if (qr) coef += cq * (q_t * inv_t - ref_lse[r]);
    const float p = logp > -87.0f ? std::exp(logp) : 0.0f;
    store_element(o + t, ((p > 0.0f ? p * coef : 0.0f) + g_lp[r]) * inv_t);
  }
}

/// Runs rows(r0, r1) over [0, n) rows of length V on the OpenMP threads (one thread for small inputs).
template <class Rows>
void softmax_stats_parallel(int64_t n, int64_t V, const Rows& rows) {
  const int threads = n * V >= (int64_t{1} << 15) ? at::get_num_threads() : 1;
  omp_parallel(threads, [&](int thread, int count) {
    const auto [r0, r1] = thread_share(n, 1, thread, count);
    if (r0 < r1) rows(r0, r1);
  });
}

#endif

/// log p(token), entropy, KL and log-sum-exps of logits [N, V] / temperature (and ref_logits, or an empty tensor),
/// tokens [N] int64 in range. Call only when softmax_stats_kernels_apply().
inline SoftmaxRowStats softmax_stats_forward(const torch::Tensor& logits, const torch::Tensor& tokens,
                                             const torch::Tensor& ref_logits, double temperature) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto opts = logits.options().dtype(torch::kFloat);
  SoftmaxRowStats st{torch::empty({N}, opts), torch::empty({N}, opts), torch::empty({N}, opts),
                     torch::empty({N}, opts), torch::empty({N}, opts)};
#if defined(__GNUC__) && defined(__x86_64__)
  auto tok = tokens.to(torch::kLong).contiguous();
  const bool with_ref = ref_logits.defined() && ref_logits.numel() > 0;
  float_or_bf16_dispatch(logits, [&](auto element) {
    using T = decltype(element);
    const auto* x = static_cast<const T*>(logits.data_ptr());
    const auto* q = with_ref ? static_cast<const T*>(ref_logits.data_ptr()) : nullptr;
    softmax_stats_parallel(N, V, [&](int64_t r0, int64_t r1) {
      softmax_stats_rows(x, q, tok.data_ptr<int64_t>(), V, static_cast<float>(1.0 / temperature), r0, r1,
                         st.logprob.data_ptr<float>(), st.entropy.data_ptr<float>(), st.kl.data_ptr<float>(),
                         st.lse.data_ptr<float>(), st.ref_lse.data_ptr<float>());
    });
  });
#else
  fail("softmax_stats_forward: the kernels need an x86-64 build");
#endif
  return st;
}

/// The gradient [N, V] (the logits' dtype) of sum g_lp log p(token) + g_ent entropy + g_kl KL with respect to
/// `logits`, from softmax_stats_forward's `stats` of the same operands; g_* are [N] fp32. Written into `out` when it
/// is defined (contiguous, of the logits' shape and dtype; it may be `logits` itself), else into a new tensor. Call
/// only when softmax_stats_kernels_apply().
inline torch::Tensor softmax_stats_backward(const torch::Tensor& logits, const torch::Tensor& tokens,
                                            const torch::Tensor& ref_logits, double temperature,
                                            const torch::Tensor& g_lp, const torch::Tensor& g_ent,
                                            const torch::Tensor& g_kl, const SoftmaxRowStats& stats,
                                            torch::Tensor out = {}) {
  const int64_t N = logits.size(0), V = logits.size(1);
  if (out.defined() && (out.sizes() != logits.sizes() || out.scalar_type() != logits.scalar_type() ||
                        !out.is_contiguous() || out.device() != logits.device()))
    fail("softmax_stats_backward: out must be a contiguous tensor of the logits' shape and dtype");
  auto grad = out.defined() ? out : torch::empty_like(logits);
#if defined(__GNUC__) && defined(__x86_64__)
  auto tok = tokens.to(torch::kLong).contiguous();
  auto f32 = [](const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); };
  auto glp = f32(g_lp), gent = f32(g_ent), gkl = f32(g_kl);
  auto ent = f32(stats.entropy), kl = f32(stats.kl), lse = f32(stats.lse), ref_lse = f32(stats.ref_lse);
  const bool with_ref = ref_logits.defined() && ref_logits.numel() > 0;
  float_or_bf16_dispatch(logits, [&](auto element) {
    using T = decltype(element);
    const auto* x = static_cast<const T*>(logits.data_ptr());
    const auto* q = with_ref ? static_cast<const T*>(ref_logits.data_ptr()) : nullptr;
    auto* out = static_cast<T*>(grad.data_ptr());
    softmax_stats_parallel(N, V, [&](int64_t r0, int64_t r1) {
      softmax_stats_grad_rows(x, q, tok.data_ptr<int64_t>(), V, static_cast<float>(1.0 / temperature),
                              glp.data_ptr<float>(), gent.data_ptr<float>(), gkl.data_ptr<float>(),
                              ent.data_ptr<float>(), kl.data_ptr<float>(), lse.data_ptr<float>(),
                              ref_lse.data_ptr<float>(), out, r0, r1);
    });
  });
#else
  fail("softmax_stats_backward: the kernels need an x86-64 build");
#endif
  return grad;
}

}  // namespace rlhf::detail
