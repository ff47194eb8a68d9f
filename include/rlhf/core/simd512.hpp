#pragma once
/// @file AVX-512 building blocks of the element-wise kernels (GELU, the softmax statistics): partial loads and
/// stores of fp32 and bf16 (as uint16_t) vectors, bf16 rounding, exp of non-positive arguments, and the test of
/// whether a tensor can take such a kernel.

#include <algorithm>
#include <cstdint>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/small_matmul.hpp>

namespace rlhf::detail {

/// Whether this CPU has what the element-wise kernels use: AVX-512 F, BW and VL.
inline bool avx512_supported() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl");
  return supported;
#else
  return false;
#endif
}

#if defined(__GNUC__) && defined(__x86_64__)

/// The target of every function that uses the helpers below.
#define RLHF_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// The zero-masked forms of the intrinsics, with every lane selected: GCC 12's unmasked ones start from an
// "undefined" vector that -Wmaybe-uninitialized reports.
inline constexpr __mmask16 all16 = 0xFFFF;

/// The first `count` (1-16) of 16 floats, the others 0 (their memory not read).
RLHF_AVX512_TARGET inline __m512 load_part(const float* p, int64_t count) {
  return count == 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes_below(count), p);
}

/// The first `count` (1-16) of 16 bf16 as floats, the others 0 (their memory not read). bf16 is the high half of
/// fp32.
RLHF_AVX512_TARGET inline __m512 load_part(const uint16_t* p, int64_t count) {
  const __m256i half = count == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                   : _mm256_maskz_loadu_epi16(lanes_below(count), p);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, half), 16));
}

/// The largest of the 16 lanes (for lanes without NaN) and their sum, through memory: GCC 12's _mm512_reduce_max_ps
/// and _mm512_reduce_add_ps use unmasked shuffles that -Wmaybe-uninitialized reports.
RLHF_AVX512_TARGET inline float lanes_max(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  return *std::max_element(lanes, lanes + 16);
}
RLHF_AVX512_TARGET inline float lanes_sum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float total = 0;
  for (float lane : lanes) total += lane;
  return total;
}

/// 16 floats rounded to bf16 (to nearest even; NaN stays NaN), stored.
RLHF_AVX512_TARGET inline void store_bf16x16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(all16, round_bf16_lanes(v)));
}

/// The first `count` (1-16) of 16 floats stored (the memory past them untouched).
RLHF_AVX512_TARGET inline void store_part(float* p, __m512 v, int64_t count) {
  if (count == 16) return _mm512_storeu_ps(p, v);
  _mm512_mask_storeu_ps(p, lanes_below(count), v);
}

/// The first `count` (1-16) of 16 floats rounded to bf16 and stored (the memory past them untouched).
RLHF_AVX512_TARGET inline void store_part(uint16_t* p, __m512 v, int64_t count) {
  if (count == 16) return store_bf16x16(p, v);
  alignas(32) uint16_t all[16];
  store_bf16x16(all, v);
  _mm256_mask_storeu_epi16(p, lanes_below(count), _mm256_load_si256(reinterpret_cast<const __m256i*>(all)));
}

/// exp(y) for y <= 0 (to ~1 ulp; below -87 the result is 0 or near it): 2^n p(r), y = n ln 2 + r, |r| <= ln 2 / 2.
RLHF_AVX512_TARGET inline __m512 exp_nonpositive(__m512 y) {
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

/// Lanes of d above -87 (the others, -inf and NaN among them, have probability 0), within the first `count`.
RLHF_AVX512_TARGET inline __mmask16 live_lanes(__m512 d, int64_t count) {
  return _mm512_cmp_ps_mask(d, _mm512_set1_ps(-87.0f), _CMP_GT_OQ) & lanes_below(count);
}

#endif

/// Whether the element-wise kernels take `x`: an fp32 or bf16 CPU tensor, a CPU with AVX-512 F, BW and VL, and the
/// kernels not capped below AVX-512 (set_decode_isa()).
inline bool avx512_kernels_apply(const torch::Tensor& x) {
  const auto dtype = x.scalar_type();
  return avx512_supported() && decode_isa() >= DecodeIsa::avx512 && x.device().is_cpu() &&
         x.layout() == torch::kStrided && (dtype == torch::kFloat || dtype == torch::kBFloat16);
}

/// `f(T{})` with T the element type of `x`'s dtype as the kernels see it: float, or uint16_t for bf16.
template <class F>
void float_or_bf16_dispatch(const torch::Tensor& x, const F& f) {
  if (x.scalar_type() == torch::kBFloat16)
    f(uint16_t{});
  else
    f(float{});
}

#if defined(__GNUC__) && defined(__x86_64__)
/// Columns [c0, c1) of the column sums of `x` [M, N] (row-major, fp32 or bf16 as uint16_t) into `out`, in fp32,
/// rows added in order: blocks of 128 columns, eight accumulators, each row's 128 values read together.
template <class T>
RLHF_AVX512_TARGET inline void column_sums_kernel(const T* x, int64_t m, int64_t n, int64_t c0, int64_t c1,
                                                  float* out) {
  constexpr int64_t block = 128;
  for (int64_t c = c0; c < c1; c += block) {
    const int64_t width = std::min(block, c1 - c), vectors = (width + 15) / 16;
    __m512 acc[block / 16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t i = 0; i < m; ++i) {
      const T* row = x + i * n + c;
      for (int64_t j = 0; j < vectors; ++j)
        acc[j] = _mm512_add_ps(acc[j], load_part(row + 16 * j, std::min<int64_t>(16, width - 16 * j)));
    }
    for (int64_t j = 0; j < vectors; ++j) store_part(out + c + 16 * j, acc[j], std::min<int64_t>(16, width - 16 * j));
  }
}
#endif

/// The column sums of `x` [M, N] in fp32, as x.sum(0, false, torch::kFloat) (rows added in order, in fp32): an
/// AVX-512 pass over the threads for a contiguous fp32 or bf16 CPU matrix (torch's reduction over the leading
/// dimension of a bf16 matrix ran at ~4 GB/s here: ~150 ms of a bf16 PPO phase's bias gradients), torch otherwise.
inline torch::Tensor column_sums(const torch::Tensor& x) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (x.dim() == 2 && x.is_contiguous() && avx512_kernels_apply(x) && !x.is_conj() && !x.is_neg()) {
    const int64_t m = x.size(0), n = x.size(1);
    auto out = torch::empty({n}, x.options().dtype(torch::kFloat));
    float_or_bf16_dispatch(x, [&]<class T>(T) {
      const T* data = static_cast<const T*>(x.data_ptr());
      omp_parallel(n >= 256 && m * n >= (1 << 15) ? at::get_num_threads() : 1, [&](int thread, int threads) {
        const auto [c0, c1] = thread_share(n, 16, thread, threads);
        if (c0 < c1) column_sums_kernel(data, m, n, c0, c1, out.data_ptr<float>());
      });
    });
    return out;
  }
#endif
  return x.sum(0, /*keepdim=*/false, torch::kFloat);
}

}  // namespace rlhf::detail
