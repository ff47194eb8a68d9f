#pragma once
/// @file The tanh approximation of GELU (GPT-2's gelu_new) on fp32 and bf16 tensors, forward and backward, in
/// AVX-512. LibTorch 1.13's CPU GELU-tanh is slow: on GPT-2 small's [528, 3072] MLP activations of a minibatch it
/// takes 2.4 ms in fp32 and 13.5 ms forward, 15.6 ms backward in bf16, and 0.33 ms on a decoding step's [16, 3072]
/// (one thread). gelu_tanh() computes in fp32 registers (tanh from one exp: range reduction and a degree-6
/// polynomial) and rounds bf16 results to nearest even, as torch does.

#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>

namespace rlhf {

namespace detail {

#if defined(__GNUC__) && defined(__x86_64__)

/// tanh(sqrt(2 / pi) (x + 0.044715 x^3)), from e = exp(-2|u|): sign(u) (1 - e) / (1 + e) (absolute error ~1e-7,
/// which is what GELU's 0.5 x (1 + tanh) needs).
RLHF_AVX512_TARGET inline __m512 gelu_tanh_inner(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.7978845608028654f)),
                                 _mm512_fmadd_ps(x2, _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.0f)));
  const __m512 abs_u = _mm512_abs_ps(u);
  const __m512 e = exp_nonpositive(_mm512_mul_ps(abs_u, _mm512_set1_ps(-2.0f)));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  // sign of u (that of x) onto t
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(t), _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(int32_t(0x80000000u)))));
}

/// y = 0.5 x (1 + t) over [begin, end) of fp32 (T = float) or bf16 (T = uint16_t) arrays; `begin` a multiple of
/// 16, the last 16 may be partial (masked).
template <class T>
RLHF_AVX512_TARGET inline void gelu_tanh_forward_range(const T* x, T* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const int64_t count = std::min<int64_t>(16, end - i);
    const __m512 v = load_part(x + i, count);
    const __m512 t = gelu_tanh_inner(v);
    const __m512 out = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
    store_part(y + i, out, count);
  }
}

/// dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2 / pi) (1 + 3 0.044715 x^2)) over [begin, end), as
/// gelu_tanh_forward_range.
template <class T>
RLHF_AVX512_TARGET inline void gelu_tanh_backward_range(const T* dy, const T* x, T* dx, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16) {
    const int64_t count = std::min<int64_t>(16, end - i);
    const __m512 v = load_part(x + i, count), g = load_part(dy + i, count);
    const __m512 t = gelu_tanh_inner(v);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 du = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                    _mm512_fmadd_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(3 * 0.044715f), one));
    const __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_fnmadd_ps(t, t, one)), du,
                                         _mm512_mul_ps(half, _mm512_add_ps(one, t)));
    const __m512 out = _mm512_mul_ps(g, slope);
    store_part(dx + i, out, count);
  }
}

/// Runs `range(begin, end)` over [0, n) in shares of 16-element multiples on the OpenMP threads.
template <class Range>
void gelu_parallel(int64_t n, const Range& range) {
  const int threads = n >= (int64_t{1} << 14) ? at::get_num_threads() : 1;  // small tensors: one thread
  omp_parallel(threads, [&](int thread, int count) {
    const auto [begin, end] = thread_share(n, 16, thread, count);
    if (begin < end) range(begin, end);
  });
}

inline torch::Tensor gelu_tanh_forward(const torch::Tensor& input) {
  auto x = input.contiguous();
  auto y = torch::empty_like(x);
  float_or_bf16_dispatch(x, [&](auto element) {
    using T = decltype(element);
    const auto* xp = static_cast<const T*>(x.data_ptr());
    auto* yp = static_cast<T*>(y.data_ptr());
    gelu_parallel(x.numel(), [&](int64_t begin, int64_t end) { gelu_tanh_forward_range(xp, yp, begin, end); });
  });
  return y;
}

inline torch::Tensor gelu_tanh_backward(const torch::Tensor& grad, const torch::Tensor& input) {
  auto x = input.contiguous();
  auto g = grad.to(x.scalar_type()).contiguous();
  auto dx = torch::empty_like(x);
  float_or_bf16_dispatch(x, [&](auto element) {
    using T = decltype(element);
    const auto* xp = static_cast<const T*>(x.data_ptr());
    const auto* gp = static_cast<const T*>(g.data_ptr());
    auto* dp = static_cast<T*>(dx.data_ptr());
    gelu_parallel(x.numel(), [&](int64_t begin, int64_t end) { gelu_tanh_backward_range(gp, xp, dp, begin, end); });
  });
  return dx;
}

/// The autograd node of gelu_tanh(): saves the input, as torch's GELU does.
struct GeluTanhNode : torch::autograd::Function<GeluTanhNode> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
    return gelu_tanh_forward(x);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return {gelu_tanh_backward(grads[0], ctx->get_saved_variables()[0])};
  }
};

#endif

}  // namespace detail

/// GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), as
/// torch::gelu(x, "tanh"). fp32 and bf16 CPU tensors on CPUs with AVX-512 (F, BW and VL) take the kernels above, with
/// their own backward (first order only): fp32 results within ~1e-7 (relative to |x|) of the exact values, bf16
/// ones their rounding. Anything else, and any tensor while set_decode_isa() caps the kernels below AVX-512, goes to
/// torch::gelu.
inline torch::Tensor gelu_tanh(const torch::Tensor& x) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (detail::avx512_kernels_apply(x)) {
    if (torch::GradMode::is_enabled() && x.requires_grad()) return detail::GeluTanhNode::apply(x);
    return detail::gelu_tanh_forward(x);
  }
#endif
  return torch::gelu(x, "tanh");
}

}  // namespace rlhf
