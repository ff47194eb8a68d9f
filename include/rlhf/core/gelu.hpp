#pragma once
/// @file The tanh approximation of GELU (GPT-2's gelu_new) on fp32 and bf16 tensors, forward and backward, in
/// AVX-512. LibTorch 1.13's CPU GELU-tanh is slow: on GPT-2 small's [528, 3072] MLP activations of a minibatch it
/// takes 2.4 ms in fp32 and 13.5 ms forward, 15.6 ms backward in bf16, and 0.33 ms on a decoding step's [16, 3072]
/// (one thread). gelu_tanh() computes in fp32 registers (tanh from one exp: range reduction and a degree-6
/// polynomial) and rounds bf16 results to nearest even, as torch does.

#include <cmath>
#include <cstdint>

#include <torch/torch.h>

#include <rlhf/core/small_matmul.hpp>

namespace rlhf {

namespace detail {

/// Whether this CPU has what the bf16 GELU kernels use: AVX-512 F, BW and VL.
inline bool gelu_cpu_supported() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return supported;
#else
  return false;
#endif
}

#if defined(__GNUC__) && defined(__x86_64__)

#define RLHF_GELU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// The zero-masked forms of the intrinsics, with every lane selected: GCC 12's unmasked ones start from an
// "undefined" vector that -Wmaybe-uninitialized reports.
inline constexpr __mmask16 all16 = 0xFFFF;

/// The first `count` (1-16) of 16 floats, the others 0 (their memory not read).
RLHF_GELU_TARGET inline __m512 load_part(const float* p, int64_t count) {
  return count == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes_below(count), p);
}

/// The first `count` (1-16) of 16 bf16 as floats, the others 0 (their memory not read). bf16 is the high half of
/// fp32.
RLHF_GELU_TARGET inline __m512 load_part(const uint16_t* p, int64_t count) {
  const __m256i half = count == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                   : _mm256_maskz_loadu_epi16(lanes_below(count), p);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, half), 16));
}

/// 16 floats rounded to bf16 (to nearest even; NaN stays NaN), stored.
RLHF_GELU_TARGET inline void store_bf16x16(uint16_t* p, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(all16, bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_maskz_srli_epi32(all16, _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(all16, bits));
}

/// The first `count` (1-16) of 16 floats stored (the memory past them untouched).
RLHF_GELU_TARGET inline void store_part(float* p, __m512 v, int64_t count) {
  if (count == 16) return _mm512_storeu_ps(p, v);
  _mm512_mask_storeu_ps(p, lanes_below(count), v);
}

/// The first `count` (1-16) of 16 floats rounded to bf16 and stored (the memory past them untouched).
RLHF_GELU_TARGET inline void store_part(uint16_t* p, __m512 v, int64_t count) {
  if (count == 16) return store_bf16x16(p, v);
  alignas(32) uint16_t all[16];
  store_bf16x16(all, v);
  _mm256_mask_storeu_epi16(p, lanes_below(count), _mm256_load_si256(reinterpret_cast<const __m256i*>(all)));
}

/// exp(y) for y <= 0 (to ~1 ulp; below -87 the result is 0 or near it): 2^n p(r), y = n ln 2 + r, |r| <= ln 2 / 2.
RLHF_GELU_TARGET inline __m512 exp_nonpositive(__m512 y) {
  y = _mm512_maskz_max_ps(all16, y, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_maskz_roundscale_ps(all16, _mm512_mul_ps(y, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), y);  // ln 2 in two parts (Cody and Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(all16, p, n);
}

/// tanh(sqrt(2 / pi) (x + 0.044715 x^3)), from e = exp(-2|u|): sign(u) (1 - e) / (1 + e) (absolute error ~1e-7,
/// which is what GELU's 0.5 x (1 + tanh) needs).
RLHF_GELU_TARGET inline __m512 gelu_tanh_inner(__m512 x) {
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
RLHF_GELU_TARGET inline void gelu_tanh_forward_range(const T* x, T* y, int64_t begin, int64_t end) {
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
RLHF_GELU_TARGET inline void gelu_tanh_backward_range(const T* dy, const T* x, T* dx, int64_t begin, int64_t end) {
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

#undef RLHF_GELU_TARGET

/// Whether the GELU kernels take `x`: an fp32 or bf16 CPU tensor, a CPU with AVX-512 F, BW and VL, and the kernels
/// not capped below AVX-512 (set_decode_isa()).
inline bool gelu_kernels_apply(const torch::Tensor& x) {
  const auto dtype = x.scalar_type();
  return gelu_cpu_supported() && decode_isa() >= DecodeIsa::avx512 && x.device().is_cpu() &&
         x.layout() == torch::kStrided && (dtype == torch::kFloat || dtype == torch::kBFloat16);
}

/// `f(T{})` with T the element type of `x`'s dtype as the kernels see it: float, or uint16_t for bf16.
template <class F>
void gelu_dispatch(const torch::Tensor& x, const F& f) {
  if (x.scalar_type() == torch::kBFloat16)
    f(uint16_t{});
  else
    f(float{});
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
  gelu_dispatch(x, [&](auto element) {
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
  gelu_dispatch(x, [&](auto element) {
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
  if (detail::gelu_kernels_apply(x)) {
    if (torch::GradMode::is_enabled() && x.requires_grad()) return detail::GeluTanhNode::apply(x);
    return detail::gelu_tanh_forward(x);
  }
#endif
  return torch::gelu(x, "tanh");
}

}  // namespace rlhf
