#pragma once
/// @file fp32 matrix products on AVX-512 for the layers of training and of long forwards: y = bias + a b with
/// either operand transposed (any strides), and autograd nodes for the two products of GPT-2, the linear layers
/// (x w + b, w [in, out]) and the tied vocabulary projection (h wte^T), whose backward takes the same kernels.
///
/// Why: LibTorch computes fp32 products with OpenBLAS, whose kernels are chosen for the CPU when it loads. OpenBLAS
/// 0.3.21 (Debian 12) predates AMD's AVX-512 parts; where OPENBLAS_CORETYPE pins it to its Haswell (AVX2) kernels
/// (a setting such machines get because older OpenBLAS builds fail on them), half of each 512-bit FMA unit idles:
/// GPT-2 small's layer products of a training minibatch (528 x 768 x 3072) ran at 0.23-0.24 TFLOP/s with sgemm and
/// at 0.38-0.42 here, on Zen 5 with two threads. Unpinned, OpenBLAS takes its Cooperlake (AVX-512) kernels there and
/// reaches 0.36-0.40: these kernels then match it rather than beat it.
///
/// The method is the one of BLIS and OpenBLAS: both operands are packed in blocks (b: kGemmKc rows x kGemmNc
/// columns, in panels of kGemmNr = 48 columns; a: kGemmMc x kGemmKc, in panels of kGemmMr = 8 rows, each k's 8
/// values together), and an 8 x 48 tile of the result (24 of the 32 vector registers) takes one k at a time: three
/// vectors of b, eight broadcasts of a, 24 FMAs. The packing reads any strides, so transposed operands (the
/// backward's w^T and x^T, the projection's wte^T, transposed 16 x 16 blocks at a time) cost a packing pass and no
/// copy. Results are the float sums in a fixed order (blocks of kGemmKc along k), whatever the number of threads;
/// they differ from sgemm's by float rounding (~1e-6 relative).
///
/// gemm_applies() says when they run: fp32 CPU tensors, a CPU with AVX-512 F, set_decode_isa() at avx512 or above,
/// and autocast off.
///
/// The products torch computes in bf16 (under bf16 autocast, or with every operand bf16) take the same method with
/// AVX512-BF16's vdpbf16ps on CPUs that have it (gemm_bf16_applies()): operands are packed in pairs along k and
/// rounded to bf16 as they are packed, so an fp32 weight is read as it is and no bf16 copy of it is made (autocast
/// keeps one per weight while a forward's graph lives: 242 MB for GPT-2 small), and the weights' gradients come
/// out of the fp32 sums (autocast's come out of oneDNN in bf16 and are cast back). On Zen 5 with two threads the
/// products of a training minibatch run at 0.62-0.74 TFLOP/s, 80-93% of oneDNN's given bf16 operands; counting the
/// casts they save, a bf16 learning step of GPT-2 small is 2-8% faster. Elsewhere (CUDA, other CPUs) the callers use
/// torch's operators.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>

#include <rlhf/core/precision.hpp>
#include <rlhf/core/simd512.hpp>
#include <rlhf/core/small_matmul.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

namespace detail {

/// Block sizes: a tile's rows and columns, and the k, row and column extents of the packed blocks (a's block
/// kMc x kKc = 128 KB stays in L2; b's panel kKc x kNr = 48 KB is read from L1 by every row tile of a block).
inline constexpr int64_t kGemmMr = 8, kGemmNr = 48, kGemmKc = 256, kGemmMc = 128, kGemmNc = 3072;

/// A read-only view of a matrix with any strides: element (i, j) at data[i * row_stride + j * col_stride].
struct StridedMatrix {
  const float* data;
  int64_t row_stride, col_stride;
};

#if defined(__GNUC__) && defined(__x86_64__)

#define RLHF_GEMM_UNROLL _Pragma("GCC unroll 16")

/// What a tile's sums are added to in its vector j of a result row: the bias (or 0) on the first block of k, the
/// row's sums so far on the others (lanes outside `mask` 0).
__attribute__((target("avx512f"))) inline __m512 gemm_tile_base(const float* row, int j, __mmask16 mask, bool first,
                                                                const float* bias) {
  if (!first) return _mm512_maskz_loadu_ps(mask, row + 16 * j);
  return bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
}

/// c[r, j] (r < rows, j < cols, row stride ldc) = (first ? bias[j] or 0 : c[r, j]) + sum_p a[p, r] b[p, j] over the
/// packed panels a [kc, kGemmMr] and b [kc, kGemmNr]; `bias` may be null.
__attribute__((target("avx512f"))) inline void gemm_tile(int64_t kc, const float* a, const float* b, float* c,
                                                         int64_t ldc, int64_t rows, int64_t cols, bool first,
                                                         const float* bias) {
  constexpr int R = static_cast<int>(kGemmMr), C = static_cast<int>(kGemmNr / 16);
  __m512 acc[R][C];
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r)
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kc; ++p, a += R, b += kGemmNr) {
    __m512 bv[C];
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) bv[j] = _mm512_loadu_ps(b + 16 * j);
    RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
      RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_fmadd_ps(ar, bv[j], acc[r][j]);
    }
  }
  if (rows == R && cols == kGemmNr) {
    RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
      float* row = c + r * ldc;
      RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j)
        _mm512_storeu_ps(row + 16 * j, _mm512_add_ps(acc[r][j], gemm_tile_base(row, j, 0xFFFF, first, bias)));
    }
    return;
  }
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    float* row = c + r * ldc;
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) {
      const int64_t left = cols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = lanes_below(left);
      _mm512_mask_storeu_ps(row + 16 * j, mask, _mm512_add_ps(acc[r][j], gemm_tile_base(row, j, mask, first, bias)));
    }
  }
}

#undef RLHF_GEMM_UNROLL

#endif

/// Rows [i0, i0 + mc) and k [p0, p0 + kc) of `a` into panels of kGemmMr rows: panel q holds, for each k, the values
/// of its rows (rows past mc are 0).
inline void gemm_pack_a(const StridedMatrix& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t i = 0; i < mc; i += kGemmMr, out += kGemmMr * kc) {
    const int64_t rows = std::min(kGemmMr, mc - i);
    for (int64_t r = 0; r < kGemmMr; ++r) {
      if (r >= rows) {
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = 0.0f;
        continue;
      }
      const float* src = a.data + (i0 + i + r) * a.row_stride + p0 * a.col_stride;
      if (a.col_stride == 1)
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = src[p];
      else
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmMr + r] = src[p * a.col_stride];
    }
  }
}

/// Rows (k) [p0, p0 + kc) and columns [j0, j0 + nc) of `b` into panels of kGemmNr columns: panel q holds, for each
/// k, the values of its columns (columns past nc are 0).
inline void gemm_pack_b(const StridedMatrix& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t j = 0; j < nc; j += kGemmNr, out += kGemmNr * kc) {
    const int64_t cols = std::min(kGemmNr, nc - j);
    const float* src = b.data + p0 * b.row_stride + (j0 + j) * b.col_stride;
    if (b.col_stride == 1) {  // rows of b contiguous: copy row segments
      for (int64_t p = 0; p < kc; ++p) {
        const float* from = src + p * b.row_stride;
        float* to = out + p * kGemmNr;
        std::copy(from, from + cols, to);
        std::fill(to + cols, to + kGemmNr, 0.0f);
      }
    } else {  // columns of b not contiguous (b = e^T): 16 x 16 blocks transposed, the rest one value at a time
      int64_t full = 0;  // columns [0, full) x k [0, kc_full) go through transpose16x16
      const int64_t kc_full = b.row_stride == 1 ? kc / 16 * 16 : 0;
#if defined(__GNUC__) && defined(__x86_64__)
      if (kc_full > 0) {
        full = cols / 16 * 16;
        for (int64_t c = 0; c < full; c += 16)
          for (int64_t p = 0; p < kc_full; p += 16)
            transpose16x16(src + c * b.col_stride + p, b.col_stride, out + p * kGemmNr + c, kGemmNr);
      }
#endif
      for (int64_t c = 0; c < kGemmNr; ++c) {
        if (c < full) {  // the k tail of a transposed column
          const float* from = src + c * b.col_stride;
          for (int64_t p = kc_full; p < kc; ++p) out[p * kGemmNr + c] = from[p * b.row_stride];
          continue;
        }
        if (c >= cols) {
          for (int64_t p = 0; p < kc; ++p) out[p * kGemmNr + c] = 0.0f;
          continue;
        }
        const float* from = src + c * b.col_stride;
        for (int64_t p = 0; p < kc; ++p) out[p * kGemmNr + c] = from[p * b.row_stride];
      }
    }
  }
}

/// A packing buffer of at least `count` elements (4 bytes each), 64-byte aligned, kept per thread between calls (so
/// large buffers are not faulted in again for every product).
template <class T>
T* gemm_buffer(std::vector<T>& storage, int64_t count) {
  static_assert(sizeof(T) == 4);
  if (static_cast<int64_t>(storage.size()) < count + 16) storage.resize(static_cast<size_t>(count + 16));
  auto address = reinterpret_cast<uintptr_t>(storage.data());
  return reinterpret_cast<T*>((address + 63) / 64 * 64);
}

/// c [m, n] (row stride ldc) = bias + a b for rows [i0, i1) and columns [j0, j1) of c, on the calling thread.
inline void gemm_block(const StridedMatrix& a, const StridedMatrix& b, const float* bias, float* c, int64_t ldc,
                       int64_t k, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
#if defined(__GNUC__) && defined(__x86_64__)
  thread_local std::vector<float> a_storage, b_storage;
  float* packed_a = gemm_buffer(a_storage, kGemmMc * kGemmKc);
  float* packed_b = gemm_buffer(b_storage, kGemmKc * kGemmNc);
  for (int64_t jc = j0; jc < j1; jc += kGemmNc) {
    const int64_t nc = std::min(kGemmNc, j1 - jc);
    for (int64_t pc = 0; pc < k; pc += kGemmKc) {
      const int64_t kc = std::min(kGemmKc, k - pc);
      gemm_pack_b(b, pc, kc, jc, nc, packed_b);
      for (int64_t ic = i0; ic < i1; ic += kGemmMc) {
        const int64_t mc = std::min(kGemmMc, i1 - ic);
        gemm_pack_a(a, ic, mc, pc, kc, packed_a);
        for (int64_t jr = 0; jr < nc; jr += kGemmNr)
          for (int64_t ir = 0; ir < mc; ir += kGemmMr)
            gemm_tile(kc, packed_a + ir * kc, packed_b + jr * kc, c + (ic + ir) * ldc + jc + jr, ldc,
                      std::min(kGemmMr, mc - ir), std::min(kGemmNr, nc - jr), pc == 0,
                      bias ? bias + jc + jr : nullptr);
      }
    }
  }
#else
  (void)a, (void)b, (void)bias, (void)c, (void)ldc, (void)k, (void)i0, (void)i1, (void)j0, (void)j1;
  fail("gemm_block: built without the x86-64 kernels");
#endif
}

/// `block(i0, i1, j0, j1)` for each thread's share of an [m, n] result with k terms per element: threaded over the
/// longer of the result's dimensions, in whole tiles (one thread for products under ~1 MFLOP, where starting the
/// others costs more than it saves).
template <class Block>
void gemm_threads(int64_t m, int64_t n, int64_t k, const Block& block) {
  const bool small = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) < 1e6;
  omp_parallel(small ? 1 : at::get_num_threads(), [&](int thread, int threads) {
    if (n >= m) {
      const auto [j0, j1] = thread_share(n, kGemmNr, thread, threads);
      if (j0 < j1) block(int64_t{0}, m, j0, j1);
    } else {
      const auto [i0, i1] = thread_share(m, kGemmMr, thread, threads);
      if (i0 < i1) block(i0, i1, int64_t{0}, n);
    }
  });
}

/// c [m, n] (contiguous) = bias + a [m, k] b [k, n] on all of torch's threads (gemm_threads).
inline void gemm(int64_t m, int64_t n, int64_t k, const StridedMatrix& a, const StridedMatrix& b, const float* bias,
                 float* c) {
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] = bias ? bias[j] : 0.0f;
    return;
  }
  gemm_threads(m, n, k, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    gemm_block(a, b, bias, c, n, k, i0, i1, j0, j1);
  });
}

// bf16 products (AVX512-BF16). vdpbf16ps multiplies pairs of bf16 and adds both products to one fp32 lane, so both
// operands are packed in pairs along k, as 32-bit words: a's panels [k pairs, kGemmMr rows], b's [k pairs,
// kGemmNr columns], the fp32 layout with pairs for values. The tile is the fp32 one at half the k steps: three
// vectors of b words, eight broadcast words of a, 24 vdpbf16ps (32 products each, twice the FMA's 16). Operands may
// be fp32 (rounded to bf16 to nearest even as they are packed: no bf16 copy of a weight is made) or bf16, with any
// strides. Sums are fp32 throughout; a bf16 result is rounded once, from the sum over all of k (products whose k
// spans several blocks keep their partial sums in an fp32 buffer).

/// k values per packed block of the bf16 products: 512 pairs, so GPT-2's layer products (k = 768) take one block
/// and round their bf16 result once (512-deep blocks were 22-23% slower on the 528-token weight gradients). A panel
/// of b is then 96 KB, more than L1 holds, and its reads come from L2; the packing buffers of a thread take
/// 6.25 MB.
inline constexpr int64_t kGemmKcBf16 = 1024;

/// A read-only view of a matrix of fp32 or (with `bf16`) bf16 elements, with any strides: element (i, j) at
/// data[i * row_stride + j * col_stride].
struct PairSource {
  const void* data;
  int64_t row_stride, col_stride;
  bool bf16;
};

#if defined(__GNUC__) && defined(__x86_64__)

#define RLHF_GEMM_BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))
#define RLHF_GEMM_UNROLL _Pragma("GCC unroll 16")

/// Where pair `i` of line `l` goes when lines are packed in panels of `width` ([kcp, width] words each).
inline uint32_t* gemm_pair_slot(uint32_t* out, int64_t kcp, int64_t width, int64_t l, int64_t i) {
  return out + l / width * kcp * width + i * width + l % width;
}

/// The 16 words of `v` as pair `i` of lines l .. l + 16 (l a multiple of 16; width a multiple of 16, or 8).
RLHF_GEMM_BF16_TARGET inline void gemm_store_pairs16(uint32_t* out, int64_t kcp, int64_t width, int64_t l, int64_t i,
                                                     __m512i v) {
  if (width % 16 == 0) return _mm512_storeu_si512(gemm_pair_slot(out, kcp, width, l, i), v);
  // two panels: words 0-7 to the first, 8-15 to the second (masked stores write only their lanes)
  _mm512_mask_storeu_epi32(gemm_pair_slot(out, kcp, width, l, i), 0x00FF, v);
  _mm512_mask_storeu_epi32(gemm_pair_slot(out, kcp, width, l + 8, i) - 8, 0xFF00, v);
}

/// 32 consecutive elements (fp32 or bf16) as 16 words of bf16 pairs.
RLHF_GEMM_BF16_TARGET inline __m512i gemm_pairs_along(const char* p, bool bf16) {
  if (bf16) return _mm512_loadu_si512(p);
  const auto* f = reinterpret_cast<const float*>(p);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + 16), _mm512_loadu_ps(f)));
}

/// 16 consecutive elements (fp32 or bf16) as 16 bf16.
RLHF_GEMM_BF16_TARGET inline __m256i gemm_bf16x16(const char* p, bool bf16) {
  if (bf16) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(reinterpret_cast<const float*>(p))));
}

/// Words (lo[c], hi[c]) for c < 16 from two runs of 16 consecutive elements (fp32 or bf16).
RLHF_GEMM_BF16_TARGET inline __m512i gemm_pairs_across(const char* lo, const char* hi, bool bf16) {
  const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  // zero-masked forms, as elsewhere (GCC 12's unmasked ones start from an "undefined" vector)
  const __m512i a = _mm512_maskz_inserti64x4(0xFF, _mm512_setzero_si512(), gemm_bf16x16(lo, bf16), 0);
  const __m512i b = _mm512_maskz_inserti64x4(0xFF, _mm512_setzero_si512(), gemm_bf16x16(hi, bf16), 0);
  return _mm512_maskz_permutex2var_epi16(0xFFFFFFFF, a, order, b);
}

/// Packs `lines` lines x `kc` values along k of a matrix (fp32 or bf16; element (l, p) at data + (l line_stride +
/// p k_stride) elements) into panels of `width` lines ([ceil(kc / 2), width] words each: word (i, l) holds
/// elements 2i and 2i + 1 of line l, the low half first). Lines past `lines` up to a whole panel, and the high half
/// of the last pair when kc is odd, are zero. Blocks of 16 lines x 16 pairs move in registers where k or the lines
/// are contiguous (converted, interleaved or transposed); the rest one word at a time.
RLHF_GEMM_BF16_TARGET inline void gemm_pack_pairs(const void* data, bool bf16, int64_t line_stride, int64_t k_stride,
                                                  int64_t lines, int64_t kc, int64_t width, uint32_t* out) {
  const int64_t kcp = (kc + 1) / 2, padded = (lines + width - 1) / width * width;
  const int64_t size = bf16 ? 2 : 4;
  const auto* base = static_cast<const char*>(data);
  const auto at = [&](int64_t l, int64_t p) { return base + (l * line_stride + p * k_stride) * size; };
  const bool along = k_stride == 1, across = line_stride == 1 && !along;
  // Full blocks in registers: lines [0, vector_lines) x pairs [0, vector_pairs); the rest below, a word at a time.
  const int64_t vector_lines = along || across ? lines / 16 * 16 : 0, vector_pairs = along ? kc / 32 * 16 : kc / 2;
  if (across)  // the lines contiguous: each pair of rows of k interleaved, read front to back
    for (int64_t i = 0; i < vector_pairs; ++i) {
      if (const int64_t ahead = i + kPackPairsAhead; ahead < vector_pairs)  // rows a matrix row apart: see the constant
        prefetch_row_pair(at(0, 2 * ahead), at(0, 2 * ahead + 1), vector_lines * size);
      for (int64_t l = 0; l < vector_lines; l += 16)
        gemm_store_pairs16(out, kcp, width, l, i, gemm_pairs_across(at(l, 2 * i), at(l, 2 * i + 1), bf16));
    }
  alignas(64) uint32_t block[16 * 16], turned[16 * 16];
  if (along)  // k contiguous: 16 words along each of 16 lines, the block of words then transposed
    for (int64_t l = 0; l < vector_lines; l += 16)
      for (int64_t i = 0; i < vector_pairs; i += 16) {
        for (int64_t t = 0; t < 16; ++t)
          _mm512_store_si512(block + 16 * t, gemm_pairs_along(at(l + t, 2 * i), bf16));
        if (width % 16 == 0) {
          transpose16x16(block, 16, gemm_pair_slot(out, kcp, width, l, i), width);
          continue;
        }
        transpose16x16(block, 16, turned, 16);
        for (int64_t u = 0; u < 16; ++u)
          gemm_store_pairs16(out, kcp, width, l, i + u, _mm512_load_si512(turned + 16 * u));
      }
  const auto bits = [&](int64_t l, int64_t p) -> uint32_t {
    if (bf16) return *reinterpret_cast<const uint16_t*>(at(l, p));
    return c10::BFloat16(*reinterpret_cast<const float*>(at(l, p))).x;  // to nearest even, as the vector casts
  };
  for (int64_t l = 0; l < padded; ++l)
    for (int64_t i = l < vector_lines ? vector_pairs : 0; i < kcp; ++i) {
      uint32_t word = 0;
      if (l < lines) word = bits(l, 2 * i) | (2 * i + 1 < kc ? bits(l, 2 * i + 1) << 16 : 0u);
      *gemm_pair_slot(out, kcp, width, l, i) = word;
    }
}

/// One 8 x 48 tile of a bf16 product over the packed panels a [kcp, kGemmMr] and b [kcp, kGemmNr] (words of pairs):
/// sum = (first ? bias[j] or 0 : c[r, j]) + the tile's terms, for r < rows, j < cols; stored rounded to bf16 in
/// `out` (row stride ldo) on the last block of k when `out` is given, else as fp32 in `c` (row stride ldc).
RLHF_GEMM_BF16_TARGET inline void gemm_bf16_tile(int64_t kcp, const uint32_t* a, const uint32_t* b, float* c,
                                                 int64_t ldc, uint16_t* out, int64_t ldo, int64_t rows, int64_t cols,
                                                 bool first, bool last, const float* bias) {
  constexpr int R = static_cast<int>(kGemmMr), C = static_cast<int>(kGemmNr / 16);
  __m512 acc[R][C];
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r)
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kcp; ++i, a += R, b += kGemmNr) {
    __m512bh bv[C];
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) bv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16 * j));
    RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
      const auto ar = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r])));
      RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], ar, bv[j]);
    }
  }
  const bool rounded = last && out != nullptr;
  RLHF_GEMM_UNROLL for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    RLHF_GEMM_UNROLL for (int j = 0; j < C; ++j) {
      const int64_t left = cols - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = lanes_below(left);
      const __m512 sum = _mm512_add_ps(acc[r][j], gemm_tile_base(first ? nullptr : c + r * ldc, j, mask, first, bias));
      if (rounded)
        _mm256_mask_storeu_epi16(out + r * ldo + 16 * j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sum)));
      else
        _mm512_mask_storeu_ps(c + r * ldc + 16 * j, mask, sum);
    }
  }
}

#undef RLHF_GEMM_UNROLL

#endif

/// Rows [i0, i1) and columns [j0, j1) of a bf16 product: the fp32 result in c (row stride ldc), or with `out` the
/// bf16 result there (row stride ldo; c then holds the partial sums when k spans several blocks, and may be null
/// when it does not). On the calling thread.
inline void gemm_bf16_block(const PairSource& a, const PairSource& b, const float* bias, float* c, int64_t ldc,
                            uint16_t* out, int64_t ldo, int64_t k, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
#if defined(__GNUC__) && defined(__x86_64__)
  constexpr int64_t kcp_max = kGemmKcBf16 / 2;
  thread_local std::vector<uint32_t> a_storage, b_storage;
  uint32_t* packed_a = gemm_buffer(a_storage, kGemmMc * kcp_max);
  uint32_t* packed_b = gemm_buffer(b_storage, kGemmNc * kcp_max);
  const auto element = [](const PairSource& s, int64_t i, int64_t j) {
    return static_cast<const char*>(s.data) + (i * s.row_stride + j * s.col_stride) * (s.bf16 ? 2 : 4);
  };
  for (int64_t jc = j0; jc < j1; jc += kGemmNc) {
    const int64_t nc = std::min(kGemmNc, j1 - jc);
    for (int64_t pc = 0; pc < k; pc += kGemmKcBf16) {
      const int64_t kc = std::min(kGemmKcBf16, k - pc), kcp = (kc + 1) / 2;
      const bool first = pc == 0, last = pc + kc >= k;
      for (int64_t ic = i0; ic < i1; ic += kGemmMc) {
        const int64_t mc = std::min(kGemmMc, i1 - ic);
        gemm_pack_pairs(element(a, ic, pc), a.bf16, a.row_stride, a.col_stride, mc, kc, kGemmMr, packed_a);
        for (int64_t jr = 0; jr < nc; jr += kGemmNr) {
          if (ic == i0)  // b's panels packed as the first block of rows reaches them
            gemm_pack_pairs(element(b, pc, jc + jr), b.bf16, b.col_stride, b.row_stride, std::min(kGemmNr, nc - jr),
                            kc, kGemmNr, packed_b + jr * kcp);
          for (int64_t ir = 0; ir < mc; ir += kGemmMr) {
            const int64_t row = ic + ir, column = jc + jr;
            gemm_bf16_tile(kcp, packed_a + ir * kcp, packed_b + jr * kcp, c ? c + row * ldc + column : nullptr, ldc,
                           out ? out + row * ldo + column : nullptr, ldo, std::min(kGemmMr, mc - ir),
                           std::min(kGemmNr, nc - jr), first, last, bias ? bias + column : nullptr);
          }
        }
      }
    }
  }
#else
  (void)a, (void)b, (void)bias, (void)c, (void)ldc, (void)out, (void)ldo, (void)k, (void)i0, (void)i1, (void)j0,
      (void)j1;
  fail("gemm_bf16_block: built without the x86-64 kernels");
#endif
}

/// Whether the kernels can read every defined one of `tensors` in place: strided CPU tensors of one of `dtypes`,
/// without a pending conjugation or negation.
inline bool gemm_operands_of(std::initializer_list<const torch::Tensor*> tensors,
                             std::initializer_list<torch::ScalarType> dtypes) {
  return std::all_of(tensors.begin(), tensors.end(), [&](const torch::Tensor* t) {
    return !t->defined() ||
           (t->device().is_cpu() && t->layout() == torch::kStrided && !t->is_conj() && !t->is_neg() &&
            std::find(dtypes.begin(), dtypes.end(), t->scalar_type()) != dtypes.end());
  });
}

/// Throws, naming `who` and the shapes, unless `bias` [N] (or undefined) + `a` [M, K] `b` [K, N] is a product.
inline void check_addmm_shapes(const char* who, const torch::Tensor& bias, const torch::Tensor& a,
                               const torch::Tensor& b) {
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0) ||
      (bias.defined() && (bias.dim() != 1 || bias.size(0) != b.size(1))))
    fail("{}: shapes {} x {} (bias {}) do not make a product [M, K] x [K, N] + [N]", who, format_shape(a.sizes()),
         format_shape(b.sizes()), bias.defined() ? format_shape(bias.sizes()) : std::string("none"));
}

}  // namespace detail

/// Whether the kernels of this file take a product of these tensors (undefined ones are skipped): every one fp32,
/// strided and on the CPU, a CPU with AVX-512 F, set_decode_isa() at avx512 or above, and CPU autocast off. Unlike
/// the decoding kernels they serve autograd (through the nodes below) and any strides.
inline bool gemm_applies(std::initializer_list<const torch::Tensor*> tensors) {
  if (decode_isa() < DecodeIsa::avx512 || autocast_enabled(torch::kCPU)) return false;
  return detail::gemm_operands_of(tensors, {torch::kFloat});
}

/// `bias` [N] (or undefined) + `a` [M, K] `b` [K, N] on the kernels, as a new contiguous [M, N] tensor, for operands
/// of any strides (a transposed view is read in place); no autograd graph is recorded. Throws unless
/// gemm_applies() holds and the shapes agree.
inline torch::Tensor gemm_addmm(const torch::Tensor& bias, const torch::Tensor& a, const torch::Tensor& b) {
  if (!gemm_applies({&bias, &a, &b}))
    detail::fail("gemm_addmm: needs fp32 CPU tensors, AVX-512 and autocast off (see gemm_applies)");
  detail::check_addmm_shapes("gemm_addmm", bias, a, b);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  auto c = torch::empty({m, n}, a.options());
  if (m == 0 || n == 0) return c;
  auto bias_c = bias.defined() ? bias.contiguous() : torch::Tensor();
  detail::gemm(m, n, k, {a.data_ptr<float>(), a.stride(0), a.stride(1)},
               {b.data_ptr<float>(), b.stride(0), b.stride(1)}, bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
               c.data_ptr<float>());
  return c;
}

/// Whether the bf16 kernels can take a product of these tensors (undefined ones are skipped): every one fp32 or bf16,
/// strided and on the CPU, and a CPU with AVX512-BF16 (and BW, VL) with set_decode_isa() at avx512_bf16.
inline bool gemm_bf16_supported(std::initializer_list<const torch::Tensor*> tensors) {
  return decode_isa() >= DecodeIsa::avx512_bf16 && detail::gemm_operands_of(tensors, {torch::kFloat, torch::kBFloat16});
}

/// Whether a product of these tensors is one torch computes in bf16 and the bf16 kernels take: gemm_bf16_supported(),
/// and either CPU autocast on with bf16 (fp32 operands are cast) or autocast off and every operand bf16.
inline bool gemm_bf16_applies(std::initializer_list<const torch::Tensor*> tensors) {
  if (!gemm_bf16_supported(tensors)) return false;
  if (autocast_enabled(torch::kCPU)) return autocast_dtype(torch::kCPU) == torch::kBFloat16;
  return std::all_of(tensors.begin(), tensors.end(),
                     [](const auto* t) { return !t->defined() || t->scalar_type() == torch::kBFloat16; });
}

/// `bias` [N] (or undefined) + `a` [M, K] `b` [K, N] on the bf16 kernels, as a new contiguous [M, N] tensor of
/// `dtype` (kFloat or kBFloat16): the operands (fp32 or bf16, any strides; a transposed view is read in place) are
/// rounded to bf16 as they are packed, the products summed in fp32 with the bias (taken as it is, in fp32), and a bf16
/// result rounded from those sums. No autograd graph is recorded. Throws unless gemm_bf16_supported() holds and the
/// shapes agree.
inline torch::Tensor gemm_bf16_addmm(const torch::Tensor& bias, const torch::Tensor& a, const torch::Tensor& b,
                                     torch::ScalarType dtype) {
  if (!gemm_bf16_supported({&bias, &a, &b}) || (dtype != torch::kFloat && dtype != torch::kBFloat16))
    detail::fail("gemm_bf16_addmm: needs fp32 or bf16 CPU tensors, AVX512-BF16 and an fp32 or bf16 result "
                 "(see gemm_bf16_supported)");
  detail::check_addmm_shapes("gemm_bf16_addmm", bias, a, b);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  auto result = torch::empty({m, n}, a.options().dtype(dtype));
  if (m == 0 || n == 0) return result;
  auto bias_c = bias.defined() ? bias.to(torch::kFloat).contiguous() : torch::Tensor();
  if (k == 0) return bias_c.defined() ? result.copy_(bias_c.expand({m, n})) : result.zero_();
  const bool rounded = dtype == torch::kBFloat16;
  const detail::PairSource pa{a.data_ptr(), a.stride(0), a.stride(1), a.scalar_type() == torch::kBFloat16};
  const detail::PairSource pb{b.data_ptr(), b.stride(0), b.stride(1), b.scalar_type() == torch::kBFloat16};
  const float* bias_p = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const int threads = at::get_num_threads();
  if (threads > 1 && k >= 16 * std::max(m, n) && 2.0 * static_cast<double>(m) * static_cast<double>(n) *
                                                         static_cast<double>(k) >= 1e8) {
    // k far beyond m and n (the vocabulary projection's input gradient, dlogits wte: 400 x 768 x 50257): threaded
    // over the columns, every thread would pack all of a (20M values each); split along k instead, each thread packs
    // its share of both operands into fp32 partial sums of the whole result, added up after (the order of that sum
    // follows the number of threads).
    // zeros: a thread that does not run (a call from inside a parallel region runs on one) adds nothing
    auto partial = torch::zeros({threads, m, n}, a.options().dtype(torch::kFloat));
    const auto element_size = [](const detail::PairSource& s) { return s.bf16 ? 2 : 4; };
    detail::omp_parallel(threads, [&](int thread, int count) {
      const auto [k0, k1] = detail::thread_share(k, 2, thread, count);
      float* c = partial.data_ptr<float>() + thread * m * n;
      if (k0 >= k1) return;
      auto sa = pa, sb = pb;  // the operands from k0 on
      sa.data = static_cast<const char*>(pa.data) + k0 * pa.col_stride * element_size(pa);
      sb.data = static_cast<const char*>(pb.data) + k0 * pb.row_stride * element_size(pb);
      detail::gemm_bf16_block(sa, sb, thread == 0 ? bias_p : nullptr, c, n, nullptr, n, k1 - k0, 0, m, 0, n);
    });
    return rounded ? result.copy_(partial.sum(0)) : torch::sum_out(result, partial, {0});
  }
  // A bf16 result whose k spans several blocks keeps its partial sums in fp32 until the last block.
  auto sums = !rounded ? result : k > detail::kGemmKcBf16 ? torch::empty({m, n}, a.options().dtype(torch::kFloat))
                                                          : torch::Tensor();
  float* c = sums.defined() ? sums.data_ptr<float>() : nullptr;
  auto* out = rounded ? static_cast<uint16_t*>(result.data_ptr()) : nullptr;
  detail::gemm_threads(m, n, k, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    detail::gemm_bf16_block(pa, pb, bias_p, c, n, out, n, k, i0, i1, j0, j1);
  });
  return result;
}

namespace detail {

/// Whether autograd records a product of these tensors: grad mode on and one of them requires a gradient.
inline bool needs_graph(std::initializer_list<const torch::Tensor*> tensors) {
  if (!torch::GradMode::is_enabled()) return false;
  return std::any_of(tensors.begin(), tensors.end(), [](const auto* t) { return t->defined() && t->requires_grad(); });
}

/// y = bias + x w (w [K, N]) with its gradients on the kernels: dx = dy w^T, dw = x^T dy, dbias = the column sums of
/// dy. With create_graph the backward takes torch's operators, so it can be differentiated again.
struct GemmAddmmFunction : torch::autograd::Function<GemmAddmmFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& bias,
                               const torch::Tensor& x, const torch::Tensor& w) {
    ctx->save_for_backward({x, w});
    return gemm_addmm(bias, x, w);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &dy = grads[0];
    const bool kernels = !torch::GradMode::is_enabled() && gemm_applies({&dy});
    torch::Tensor dbias, dx, dw;
    if (ctx->needs_input_grad(0)) dbias = kernels ? column_sums(dy).to(dy.scalar_type()) : dy.sum(0);
    if (ctx->needs_input_grad(1)) dx = kernels ? gemm_addmm({}, dy, w.t()) : torch::mm(dy, w.t());
    if (ctx->needs_input_grad(2)) dw = kernels ? gemm_addmm({}, x.t(), dy) : torch::mm(x.t(), dy);
    return {dbias, dx, dw};
  }
};

/// The gradients of y = x e^T (e [N, K], the tied vocabulary projection) for dy: dx = dy e (in `x_dtype`) and
/// de = dy^T x (in e's dtype), each only when wanted. `reduced`: the product was computed in bf16 (x saved in bf16):
/// the bf16 kernels where they apply (dy and x rounded to bf16, fp32 sums, so an fp32 e's gradient is not rounded to
/// bf16 first), else torch's mm in fp32; otherwise the fp32 kernels where they apply, else torch's mm. With grad mode
/// on (create_graph) torch's operators, so the gradients can be differentiated again.
inline std::pair<torch::Tensor, torch::Tensor> mm_nt_grads(const torch::Tensor& dy, const torch::Tensor& x,
                                                           const torch::Tensor& e, torch::ScalarType x_dtype,
                                                           bool reduced, bool want_dx, bool want_de) {
  const bool graph = torch::GradMode::is_enabled();
  torch::Tensor dx, de;
  if (reduced) {
    const bool kernels = !graph && gemm_bf16_supported({&dy, &x, &e});
    if (want_dx)
      dx = kernels ? gemm_bf16_addmm({}, dy, e, x_dtype)
                   : torch::mm(dy.to(torch::kFloat), e.to(torch::kFloat)).to(x_dtype);
    if (want_de)
      de = kernels ? gemm_bf16_addmm({}, dy.t(), x, e.scalar_type())
                   : torch::mm(dy.t().to(torch::kFloat), x.to(torch::kFloat)).to(e.scalar_type());
  } else {
    const bool kernels = !graph && gemm_applies({&dy, &x, &e});
    if (want_dx) dx = (kernels ? gemm_addmm({}, dy, e) : torch::mm(dy, e)).to(x_dtype);
    if (want_de) de = kernels ? gemm_addmm({}, dy.t(), x) : torch::mm(dy.t(), x);
  }
  return {dx, de};
}

/// y = x e^T (e [N, K], the tied vocabulary projection) with its gradients on the kernels: dx = dy e, de = dy^T x.
struct GemmMmNtFunction : torch::autograd::Function<GemmMmNtFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& e) {
    ctx->save_for_backward({x, e});
    return gemm_addmm({}, x, e.t());
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &e = saved[1];
    auto [dx, de] = mm_nt_grads(grads[0], x, e, x.scalar_type(), false, ctx->needs_input_grad(0),
                                ctx->needs_input_grad(1));
    return {dx, de};
  }
};

/// bf16(bias + x w) (w [K, N]) on the bf16 kernels, as torch's addmm under bf16 autocast (x, w and the bias rounded
/// to bf16, fp32 sums) without a bf16 copy of w: its gradients dx = dy w^T (in x's dtype), dw = x^T dy (in w's: an
/// fp32 weight's gradient comes out of the fp32 sums, not rounded to bf16 first) and dbias = the column sums of dy
/// (summed in fp32, in the bias's dtype). x is saved in bf16. With create_graph the backward takes torch's operators
/// in fp32.
struct GemmBf16AddmmFunction : torch::autograd::Function<GemmBf16AddmmFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& bias,
                               const torch::Tensor& x, const torch::Tensor& w) {
    auto x16 = x.to(torch::kBFloat16);
    ctx->save_for_backward({x16, w});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.defined() ? bias.scalar_type() : torch::kFloat);
    return gemm_bf16_addmm(bias.defined() ? bias.to(torch::kBFloat16) : bias, x16, w, torch::kBFloat16);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x16 = saved[0], &w = saved[1], &dy = grads[0];
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const auto bias_dtype = static_cast<torch::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    const bool kernels = !torch::GradMode::is_enabled() && gemm_bf16_supported({&dy});
    torch::Tensor dbias, dx, dw;
    if (ctx->needs_input_grad(0))
      dbias = (kernels ? column_sums(dy) : dy.sum(0, false, torch::kFloat)).to(bias_dtype);
    if (ctx->needs_input_grad(1))
      dx = kernels ? gemm_bf16_addmm({}, dy, w.t(), x_dtype)
                   : torch::mm(dy.to(torch::kFloat), w.t().to(torch::kFloat)).to(x_dtype);
    if (ctx->needs_input_grad(2))
      dw = kernels ? gemm_bf16_addmm({}, x16.t(), dy, w.scalar_type())
                   : torch::mm(x16.t().to(torch::kFloat), dy.to(torch::kFloat)).to(w.scalar_type());
    return {dbias, dx, dw};
  }
};

/// bf16(x e^T) (e [N, K], the tied vocabulary projection) on the bf16 kernels, as torch's matmul under bf16
/// autocast, without a bf16 copy of e: dx = dy e (in x's dtype), de = dy^T x (in e's). x is saved in bf16.
struct GemmBf16MmNtFunction : torch::autograd::Function<GemmBf16MmNtFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& e) {
    auto x16 = x.to(torch::kBFloat16);
    ctx->save_for_backward({x16, e});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return gemm_bf16_addmm({}, x16, e.t(), torch::kBFloat16);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    auto [dx, de] = mm_nt_grads(grads[0], saved[0], saved[1], x_dtype, true, ctx->needs_input_grad(0),
                                ctx->needs_input_grad(1));
    return {dx, de};
  }
};

}  // namespace detail

/// `bias` [N] + `x` [M, K] `w` [K, N] (Conv1D's layout), the product of GPT-2's linear layers, adapted or not: the
/// few-row decoding kernels where they apply (inference, up to small_rows_addmm_max_rows() rows), then this file's
/// kernels (with autograd), then torch::addmm.
inline torch::Tensor linear_addmm(const torch::Tensor& bias, const torch::Tensor& x, const torch::Tensor& w) {
  if (auto y = small_rows_addmm(bias, x, w); y.defined()) return y;
  const bool shapes = x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(0) &&
                      (!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(1)));
  // The autograd nodes take a defined bias (torch 1.13 records every input's device): a zero one that needs no
  // gradient stands in for none.
  const auto node_bias = [&] { return bias.defined() ? bias : torch::zeros({w.size(1)}, w.options()); };
  if (shapes && gemm_bf16_applies({&bias, &x, &w}))
    return detail::needs_graph({&bias, &x, &w})
               ? detail::GemmBf16AddmmFunction::apply(node_bias(), x, w)
               : gemm_bf16_addmm(bias.defined() ? bias.to(torch::kBFloat16) : bias, x, w, torch::kBFloat16);
  if (shapes && gemm_applies({&bias, &x, &w}))
    return detail::needs_graph({&bias, &x, &w}) ? detail::GemmAddmmFunction::apply(node_bias(), x, w)
                                                : gemm_addmm(bias, x, w);
  return torch::addmm(bias, x, w);
}

/// `x` [M, K] `e`^T with `e` [N, K], the tied vocabulary projection: the few-row decoding kernels where they apply,
/// then this file's kernels (with autograd), then torch::matmul.
inline torch::Tensor linear_mm_nt(const torch::Tensor& x, const torch::Tensor& e) {
  if (auto y = small_rows_mm_nt(x, e); y.defined()) return y;
  const bool shapes = x.dim() == 2 && e.dim() == 2 && x.size(1) == e.size(1);
  if (shapes && gemm_bf16_applies({&x, &e}))
    return detail::needs_graph({&x, &e}) ? detail::GemmBf16MmNtFunction::apply(x, e)
                                         : gemm_bf16_addmm({}, x, e.t(), torch::kBFloat16);
  if (shapes && gemm_applies({&x, &e}))
    return detail::needs_graph({&x, &e}) ? detail::GemmMmNtFunction::apply(x, e) : gemm_addmm({}, x, e.t());
  return torch::matmul(x, e.t());
}

}  // namespace rlhf
