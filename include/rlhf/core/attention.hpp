#pragma once
/// @file GPT-2's attention over a whole sequence (the learning updates' forwards and backwards, the reference's
/// forward) in bf16 on the CPU, one head at a time: scores = q k^T on the bf16 product kernels of core/gemm.hpp
/// (fp32 sums), softmax(scores * scale + bias) in fp32, out = p v with p rounded to bf16 as it is packed (as
/// autocast's bf16 matmul rounds it), written straight into the [B, T, H Dh] layout the output projection reads.
/// The backward takes the same kernels, reading q, k and v inside the fused [B, T, 3 D] projection and writing their
/// gradients into one [B, T, 3 D] tensor (the gradient of that projection's output).
///
/// Why: composed of torch's operators (two batched products on oneDNN, a cast, a scale, the bias, the softmax, a cast,
/// the head-merging copy; the backward twice as many, plus stacking the three gradients) GPT-2 small's attention of
/// a learning minibatch (8 x 66 tokens, 12 heads) took 0.9-1.3 ms forward and 1.1-1.8 ms backward per layer here
/// (Zen 5, two threads), 0.19-0.31 s of a PPO phase's updates; these kernels take 0.49 and 0.91 ms.
///
/// Sums differ from torch's composition by rounding: the scores and the gradient of p stay fp32 here where
/// autocast's products round them to bf16.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/gemm.hpp>
#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>

namespace rlhf {

namespace detail {

#if defined(__GNUC__) && defined(__x86_64__)

/// p[j] = softmax_j(s[j] scale + bias[j]) for j < n (fp32; entries whose exponent falls below -87 get 0, as
/// ppo_math's kernels count them).
RLHF_AVX512_TARGET inline void attention_softmax_row(const float* s, const float* bias, int64_t n, float scale,
                                                     float* p) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    const __m512 x = _mm512_fmadd_ps(load_part(s + j, count), _mm512_set1_ps(scale), load_part(bias + j, count));
    store_part(p + j, x, count);
    top = _mm512_mask_max_ps(top, lanes_below(count), top, x);
  }
  const __m512 m = _mm512_set1_ps(lanes_max(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    const __m512 d = _mm512_sub_ps(load_part(p + j, count), m);
    const __m512 e = _mm512_maskz_mov_ps(live_lanes(d, count), exp_nonpositive(d));
    store_part(p + j, e, count);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / lanes_sum(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    store_part(p + j, _mm512_mul_ps(load_part(p + j, count), inv), count);
  }
}

/// ds[j] = p[j] (dp[j] - sum_l p[l] dp[l]) scale for j < n, in place of dp: the softmax's backward, and the scale's.
RLHF_AVX512_TARGET inline void attention_softmax_backward_row(const float* p, float* dp, int64_t n, float scale) {
  __m512 dot = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    dot = _mm512_fmadd_ps(load_part(p + j, count), load_part(dp + j, count), dot);
  }
  const __m512 total = _mm512_set1_ps(lanes_sum(dot)), s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t count = std::min<int64_t>(16, n - j);
    const __m512 g = _mm512_mul_ps(load_part(p + j, count), _mm512_sub_ps(load_part(dp + j, count), total));
    store_part(dp + j, _mm512_mul_ps(g, s), count);
  }
}

#endif

/// Head `h` of batch row `b` of a [B, T, 3 D] projection (or of its gradient): q, k or v (`part` 0, 1, 2) as a
/// [T, Dh] matrix, or transposed.
inline PairSource qkv_head(const torch::Tensor& qkv, int64_t b, int64_t h, int part, int64_t d_head, bool transposed) {
  const int64_t d = qkv.size(2) / 3;
  const auto* base = static_cast<const uint16_t*>(qkv.data_ptr()) + b * qkv.stride(0) + part * d + h * d_head;
  return transposed ? PairSource{base, 1, qkv.stride(1), true} : PairSource{base, qkv.stride(1), 1, true};
}

/// Whether the fused attention takes these: a contiguous bf16 CPU projection [B, T, 3 D] with D a multiple of the
/// heads and 1 <= T <= kGemmKcBf16, an fp32 bias broadcastable to [B, 1, T, T] that needs no gradient, and the bf16
/// product kernels (gemm_bf16_supported).
inline bool fused_attention_applies(const torch::Tensor& qkv, const torch::Tensor& bias, int64_t n_head) {
  if (!qkv.defined() || qkv.dim() != 3 || qkv.scalar_type() != torch::kBFloat16 || !qkv.is_contiguous() ||
      n_head < 1 || qkv.size(2) % (3 * n_head) != 0 || !gemm_bf16_supported({&qkv}) || !avx512_kernels_apply(qkv))
    return false;
  if (!bias.defined() || bias.scalar_type() != torch::kFloat || !bias.device().is_cpu() || bias.dim() != 4 ||
      bias.requires_grad())
    return false;
  const int64_t b = qkv.size(0), t = qkv.size(1);
  if (t < 1 || t > kGemmKcBf16) return false;  // the products along t take one block of k (no partial sums)
  return (bias.size(0) == b || bias.size(0) == 1) && bias.size(1) == 1 && bias.size(2) == t && bias.size(3) == t;
}

/// The forward: returns out [B, T, D] bf16 and, with `p`, sets *p to the probabilities [B, H, T, T] fp32 (for the
/// backward).
inline torch::Tensor fused_attention_forward(const torch::Tensor& qkv, const torch::Tensor& bias, int64_t n_head,
                                             double scale, torch::Tensor* probabilities = nullptr) {
  const int64_t batch = qkv.size(0), t = qkv.size(1), d = qkv.size(2) / 3, dh = d / n_head;
  auto out = torch::empty({batch, t, d}, qkv.options());
  torch::Tensor p;
  if (probabilities) *probabilities = p = torch::empty({batch, n_head, t, t}, qkv.options().dtype(torch::kFloat));
#if defined(__GNUC__) && defined(__x86_64__)
  auto* out_data = static_cast<uint16_t*>(out.data_ptr());
  float* p_data = p.defined() ? p.data_ptr<float>() : nullptr;
  const float* bias_data = bias.data_ptr<float>();
  const int64_t bias_batch = bias.size(0) == 1 ? 0 : bias.stride(0);
  omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
    const auto [h0, h1] = thread_share(batch * n_head, 1, thread, threads);
    std::vector<float> scores(static_cast<size_t>(t * t)), probs(p_data ? 0 : static_cast<size_t>(t * t));
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / n_head, h = bh % n_head;
      float* ph = p_data ? p_data + bh * t * t : probs.data();
      gemm_bf16_block(qkv_head(qkv, b, h, 0, dh, false), qkv_head(qkv, b, h, 1, dh, true), nullptr, scores.data(), t,
                      nullptr, t, dh, 0, t, 0, t);
      for (int64_t i = 0; i < t; ++i)
        attention_softmax_row(scores.data() + i * t, bias_data + b * bias_batch + i * bias.stride(2), t,
                              static_cast<float>(scale), ph + i * t);
      gemm_bf16_block(PairSource{ph, t, 1, false}, qkv_head(qkv, b, h, 2, dh, false), nullptr, nullptr, d,
                      out_data + b * t * d + h * dh, d, t, 0, t, 0, dh);
    }
  });
#else
  (void)bias, (void)scale, (void)dh;
  fail("fused_attention_forward: built without the x86-64 kernels");
#endif
  return out;
}

/// The attention of fused_attention() composed of torch's operators (the module's own formula): for the double
/// backward.
inline torch::Tensor composed_attention(const torch::Tensor& qkv, const torch::Tensor& bias, int64_t n_head,
                                        double scale) {
  const int64_t b = qkv.size(0), t = qkv.size(1), d = qkv.size(2) / 3;
  const auto parts = qkv.view({b, t, 3, n_head, d / n_head}).permute({2, 0, 3, 1, 4}).unbind(0);
  auto scores = torch::matmul(parts[0], parts[1].transpose(-2, -1)).to(torch::kFloat) * scale + bias;
  auto probs = torch::softmax(scores, -1).to(qkv.scalar_type());
  return torch::matmul(probs, parts[2]).transpose(1, 2).reshape({b, t, d});
}

/// The fused attention as an autograd node: keeps the projection, the bias and p (fp32, [B, H, T, T]); the
/// backward writes the gradient of the projection in one tensor. With create_graph the backward differentiates
/// composed_attention() instead, so it can be differentiated again.
struct FusedAttentionFunction : torch::autograd::Function<FusedAttentionFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv,
                               const torch::Tensor& bias, int64_t n_head, double scale) {
    torch::Tensor p;
    auto out = fused_attention_forward(qkv, bias, n_head, scale, &p);
    ctx->save_for_backward({qkv, bias, p});
    ctx->saved_data["n_head"] = n_head;
    ctx->saved_data["scale"] = scale;
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &qkv = saved[0], &bias = saved[1], &p = saved[2];
    const int64_t n_head = ctx->saved_data["n_head"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    if (torch::GradMode::is_enabled()) {  // create_graph: the composition's gradient, itself differentiable
      auto dqkv = torch::autograd::grad({composed_attention(qkv, bias, n_head, scale)}, {qkv}, {grads[0]},
                                        /*retain_graph=*/true, /*create_graph=*/true)[0];
      return {dqkv, torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    return {fused_attention_backward(qkv, p, grads[0], n_head, scale), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }

  /// The gradient [B, T, 3 D] (bf16) of the projection for the output's gradient `dout` [B, T, D].
  static torch::Tensor fused_attention_backward(const torch::Tensor& qkv, const torch::Tensor& p,
                                                const torch::Tensor& dout_in, int64_t n_head, double scale) {
    const int64_t batch = qkv.size(0), t = qkv.size(1), d = qkv.size(2) / 3, dh = d / n_head;
    auto dqkv = torch::empty_like(qkv);
#if defined(__GNUC__) && defined(__x86_64__)
    const auto dout = dout_in.contiguous();
    const bool dout_bf16 = dout.scalar_type() == torch::kBFloat16;
    if (!dout_bf16 && dout.scalar_type() != torch::kFloat)
      fail("fused attention: the output's gradient is {}, expected bf16 or fp32", c10::toString(dout.scalar_type()));
    const char* dout_data = static_cast<const char*>(dout.data_ptr());
    const int64_t dout_size = dout_bf16 ? 2 : 4;
    auto* dqkv_data = static_cast<uint16_t*>(dqkv.data_ptr());
    const float* p_data = p.data_ptr<float>();
    omp_parallel(at::get_num_threads(), [&](int thread, int threads) {
      const auto [h0, h1] = thread_share(batch * n_head, 1, thread, threads);
      std::vector<float> ds(static_cast<size_t>(t * t));
      for (int64_t bh = h0; bh < h1; ++bh) {
        const int64_t b = bh / n_head, h = bh % n_head;
        const float* ph = p_data + bh * t * t;
        const PairSource dout_h{dout_data + (b * t * d + h * dh) * dout_size, d, 1, dout_bf16};
        uint16_t* dq = dqkv_data + b * t * 3 * d + h * dh;
        // dv = p^T dout
        gemm_bf16_block(PairSource{ph, 1, t, false}, dout_h, nullptr, nullptr, 3 * d, dq + 2 * d, 3 * d, t, 0, t, 0,
                        dh);
        // dp = dout v^T, then ds = p (dp - rowsum(p dp)) scale in place
        gemm_bf16_block(dout_h, qkv_head(qkv, b, h, 2, dh, true), nullptr, ds.data(), t, nullptr, t, dh, 0, t, 0,
                        t);
        for (int64_t i = 0; i < t; ++i)
          attention_softmax_backward_row(ph + i * t, ds.data() + i * t, t, static_cast<float>(scale));
        // dq = ds k, dk = ds^T q
        gemm_bf16_block(PairSource{ds.data(), t, 1, false}, qkv_head(qkv, b, h, 1, dh, false), nullptr, nullptr,
                        3 * d, dq, 3 * d, t, 0, t, 0, dh);
        gemm_bf16_block(PairSource{ds.data(), 1, t, false}, qkv_head(qkv, b, h, 0, dh, false), nullptr, nullptr,
                        3 * d, dq + d, 3 * d, t, 0, t, 0, dh);
      }
    });
#else
    (void)p, (void)dout_in, (void)scale, (void)batch, (void)t, (void)d, (void)dh;
    fail("fused attention: built without the x86-64 kernels");
#endif
    return dqkv;
  }
};

}  // namespace detail

/// GPT-2's attention over whole sequences from the fused projection `qkv` [B, T, 3 D] (queries, keys, values; heads
/// of D / n_head), with the additive `bias` [B or 1, 1, T, T] (attention_bias()) and the scores' `scale`: the
/// output [B, T, D] before the output projection, on the kernels of this file (an autograd node when a gradient is
/// wanted); an undefined tensor where they do not apply (detail::fused_attention_applies; the caller composes
/// torch's operators then).
inline torch::Tensor fused_attention(const torch::Tensor& qkv, const torch::Tensor& bias, int64_t n_head,
                                     double scale) {
  if (!detail::fused_attention_applies(qkv, bias, n_head)) return {};
  const auto bias_rows = bias.stride(3) == 1 ? bias : bias.contiguous();
  if (torch::GradMode::is_enabled() && qkv.requires_grad())
    return detail::FusedAttentionFunction::apply(qkv, bias_rows, n_head, scale);
  return detail::fused_attention_forward(qkv, bias_rows, n_head, scale);
}

}  // namespace rlhf
