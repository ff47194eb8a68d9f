#pragma once
/// @file The optimiser every trainer uses: AdamW over the trainable parameters only, one parameter group per depth
/// of a GPT-2-style base model (for per-layer learning-rate decay) plus groups for heads and adapters; the
/// warmup-then-linear-decay schedule; gradient clipping over exactly the optimised parameters; saving and loading
/// the optimiser's state for checkpoints. The step is fused on the CPU for fp32 parameters: one pass over each
/// parameter's memory instead of torch::optim::AdamW's nine tensor operations, with the same state and results.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <torch/torch.h>
#include <torch/version.h>

#include <rlhf/adapters/freeze.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/train/step_callback.hpp>

namespace rlhf {

/// Learning-rate multiplier: linear warmup to 1 over `warmup_steps`, then linear decay to `final_scale` at step
/// `total_steps` (the seed notebook's lr_lambda, except that step 0 gets 1 / warmup_steps instead of 0, which
/// would waste a step).
struct WarmupDecay {
  int64_t warmup_steps = 0;  ///< e.g. 20
  int64_t total_steps = 1;   ///< steps of the whole run, e.g. 200
  double final_scale = 0.1;  ///< multiplier reached at the last step

  /// Multiplier at `step` (0-based).
  double operator()(int64_t step) const {
    if (step < warmup_steps) return static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    const double span = static_cast<double>(std::max<int64_t>(total_steps - warmup_steps, 1));
    const double progress = std::min(static_cast<double>(step - warmup_steps) / span, 1.0);
    return 1.0 - (1.0 - final_scale) * progress;
  }
};

// ---- the fused AdamW step ----

namespace detail {

/// The per-element constants of one parameter's AdamW step, as float, rounded the way torch's tensor operations
/// round their double arguments (a scalar operand of a float tensor operation is converted to float).
struct FusedAdamWCoefficients {
  float decay = 1;            ///< 1 - lr wd (1 without weight decay: multiplying by 1 is exact)
  float beta1 = 0.9f;         ///< b1
  float one_minus_beta1 = 0;  ///< 1 - b1
  float beta2 = 0.999f;       ///< b2
  float one_minus_beta2 = 0;  ///< 1 - b2
  float bias2_sqrt = 1;       ///< sqrt(1 - b2^t)
  float eps = 1e-8f;          ///< added to the denominator
  float neg_step_size = 0;    ///< -lr / (1 - b1^t)
  float grad_scale = 1;       ///< the gradient's factor, e.g. a clip factor deferred to the step (1: exact)

  /// The constants of step `t` (1-based, after the increment) with `options`.
  static FusedAdamWCoefficients at_step(const torch::optim::AdamWOptions& options, int64_t t) {
    const double b1 = std::get<0>(options.betas()), b2 = std::get<1>(options.betas());
    const double lr = options.lr(), wd = options.weight_decay();
    const double bias1 = 1 - std::pow(b1, static_cast<double>(t)), bias2 = 1 - std::pow(b2, static_cast<double>(t));
    FusedAdamWCoefficients c;
    c.decay = wd != 0 ? static_cast<float>(1 - lr * wd) : 1.0f;
    c.beta1 = static_cast<float>(b1);
    c.one_minus_beta1 = static_cast<float>(1 - b1);
    c.beta2 = static_cast<float>(b2);
    c.one_minus_beta2 = static_cast<float>(1 - b2);
    c.bias2_sqrt = static_cast<float>(std::sqrt(bias2));
    c.eps = static_cast<float>(options.eps());
    c.neg_step_size = static_cast<float>(-(lr / bias1));
    return c;
  }
};

/// AdamW (Loshchilov & Hutter, arXiv 1711.05101, as torch::optim::AdamW computes it) on `n` fp32 elements in one
/// pass: g *= grad_scale (rounded, as a separate mul_ of the gradient would); p *= 1 - lr wd;
/// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g g; p += (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps), each product
/// and sum in torch's order. Portable version: SSE2 (every x86-64) four lanes at a time, or a
/// scalar loop; the loop is bound by memory bandwidth, not arithmetic. Results agree with torch's within float
/// rounding (torch's AVX2 kernels fuse the moment updates' multiply-adds; see fused_adamw_kernel_avx2).
inline void fused_adamw_kernel_portable(float* p, const float* g, float* m, float* v, int64_t n,
                                        const FusedAdamWCoefficients& c) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 decay = _mm_set1_ps(c.decay), beta1 = _mm_set1_ps(c.beta1), beta2 = _mm_set1_ps(c.beta2);
  const __m128 one_minus_beta1 = _mm_set1_ps(c.one_minus_beta1), one_minus_beta2 = _mm_set1_ps(c.one_minus_beta2);
  const __m128 bias2_sqrt = _mm_set1_ps(c.bias2_sqrt), eps = _mm_set1_ps(c.eps);
  const __m128 neg_step_size = _mm_set1_ps(c.neg_step_size), grad_scale = _mm_set1_ps(c.grad_scale);
  for (; i + 4 <= n; i += 4) {
    const __m128 gi = _mm_mul_ps(_mm_loadu_ps(g + i), grad_scale);
    const __m128 pi = _mm_mul_ps(_mm_loadu_ps(p + i), decay);
    const __m128 mi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(m + i), beta1), _mm_mul_ps(gi, one_minus_beta1));
    const __m128 vi =
        _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(v + i), beta2), _mm_mul_ps(_mm_mul_ps(one_minus_beta2, gi), gi));
    const __m128 denom = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(vi), bias2_sqrt), eps);
    _mm_storeu_ps(m + i, mi);
    _mm_storeu_ps(v + i, vi);
    _mm_storeu_ps(p + i, _mm_add_ps(pi, _mm_div_ps(_mm_mul_ps(neg_step_size, mi), denom)));
  }
#endif
  for (; i < n; ++i) {
    const float gi = g[i] * c.grad_scale;
    const float pi = p[i] * c.decay;
    const float mi = m[i] * c.beta1 + gi * c.one_minus_beta1;
    const float vi = v[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
    const float denom = std::sqrt(vi) / c.bias2_sqrt + c.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + c.neg_step_size * mi / denom;
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
/// The kernel for CPUs with AVX2 and FMA, eight lanes at a time, rounding exactly as torch's AVX2 and AVX-512
/// kernels do: the moment updates are fused multiply-adds there (add_'s fmadd; addcmul_ contracted by the
/// compiler), the weight decay a separate multiply. The results are then bitwise those of torch::optim::AdamW, so a
/// training run takes the same trajectory with either step.
__attribute__((target("avx2,fma"))) inline void fused_adamw_kernel_avx2(float* p, const float* g, float* m,
                                                                         float* v, int64_t n,
                                                                         const FusedAdamWCoefficients& c) {
  const __m256 decay = _mm256_set1_ps(c.decay), beta1 = _mm256_set1_ps(c.beta1), beta2 = _mm256_set1_ps(c.beta2);
  const __m256 one_minus_beta1 = _mm256_set1_ps(c.one_minus_beta1);
  const __m256 one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2);
  const __m256 bias2_sqrt = _mm256_set1_ps(c.bias2_sqrt), eps = _mm256_set1_ps(c.eps);
  const __m256 neg_step_size = _mm256_set1_ps(c.neg_step_size), grad_scale = _mm256_set1_ps(c.grad_scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), grad_scale);
    __asm__("" : "+x"(gi));  // rounded before the moments use it, as after a separate mul_ of the gradient
    __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
    __asm__("" : "+x"(pi));  // rounded before the final add, as torch's separate mul_ (no contraction into an FMA)
    const __m256 mi = _mm256_fmadd_ps(gi, one_minus_beta1, _mm256_mul_ps(_mm256_loadu_ps(m + i), beta1));
    const __m256 vi =
        _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bias2_sqrt), eps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(p + i, _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(neg_step_size, mi), denom)));
  }
  for (; i < n; ++i) {
    float gi = g[i] * c.grad_scale;
    __asm__("" : "+x"(gi));
    float pi = p[i] * c.decay;
    __asm__("" : "+x"(pi));
    const float mi = __builtin_fmaf(gi, c.one_minus_beta1, m[i] * c.beta1);
    const float vi = __builtin_fmaf(c.one_minus_beta2 * gi, gi, v[i] * c.beta2);
    const float denom = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(vi))) / c.bias2_sqrt + c.eps;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + c.neg_step_size * mi / denom;
  }
}
#endif

/// The AdamW kernel for this CPU: fused_adamw_kernel_avx2 where AVX2 and FMA are available, else the portable one.
using FusedAdamWKernel = void (*)(float*, const float*, float*, float*, int64_t, const FusedAdamWCoefficients&);
inline FusedAdamWKernel fused_adamw_kernel() {
#if defined(__GNUC__) && defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return fused_adamw_kernel_avx2;
#endif
  return fused_adamw_kernel_portable;
}

/// A contiguous run of elements of one parameter for the AdamW kernel.
struct FusedAdamWChunk {
  float* param = nullptr;
  const float* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t size = 0;  ///< elements, e.g. 65536
  const FusedAdamWCoefficients* coefficients = nullptr;
};

/// Elements per chunk of the fused step: 256 KiB of each of the four arrays, large enough that handing chunks to
/// threads costs nothing measurable, small enough to balance two threads over GPT-2's 148 tensors.
inline constexpr int64_t kFusedAdamWChunk = int64_t{1} << 16;

/// Calls `run(i)` for every i in [0, count) on `threads` threads (the caller and threads - 1 others), indices
/// taken in order from a shared counter. Plain threads rather than at::parallel_for: with the OpenMP build of
/// LibTorch, at::parallel_for is an inline template whose `#pragma omp parallel` runs serially in a translation unit
/// compiled without -fopenmp.
template <class Run>
inline void run_chunks(int64_t count, int threads, const Run& run) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next++; i < count; i = next++) run(i);
  };
  const int64_t helpers = std::min<int64_t>(std::max(threads, 1), count) - 1;
  if (helpers <= 0) return work();
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(helpers));
  for (int64_t t = 0; t < helpers; ++t)
    pool.emplace_back([&work, &error = errors[static_cast<size_t>(t)]] {
      try {
        work();
      } catch (...) {
        error = std::current_exception();
      }
    });
  work();
  for (auto& thread : pool) thread.join();
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

/// Runs the AdamW kernel over every chunk on `threads` threads.
inline void run_fused_adamw(const std::vector<FusedAdamWChunk>& chunks, int threads) {
  const FusedAdamWKernel kernel = fused_adamw_kernel();
  run_chunks(static_cast<int64_t>(chunks.size()), threads, [&](int64_t i) {
    const auto& c = chunks[static_cast<size_t>(i)];
    kernel(c.param, c.grad, c.exp_avg, c.exp_avg_sq, c.size, *c.coefficients);
  });
}

/// Whether the fused kernel can update `param`: CPU fp32, and parameter, gradient and both moments laid out alike
/// over one dense block of memory (contiguous, or e.g. transposed with moments of the same strides).
inline bool fused_adamw_applies(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
                                const torch::Tensor& exp_avg_sq) {
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat || t->layout() != torch::kStrided) return false;
    if (!t->is_non_overlapping_and_dense() || t->sizes() != param.sizes() || t->strides() != param.strides())
      return false;
  }
  return true;
}

/// The key of `param`'s state in a torch optimiser's state map.
inline auto optimizer_state_key(const torch::Tensor& param) {
#if TORCH_VERSION_MAJOR >= 2
  return param.unsafeGetTensorImpl();
#else
  return c10::guts::to_string(param.unsafeGetTensorImpl());
#endif
}

/// `param`'s AdamW state in `optimizer`, created as torch::optim::AdamW creates it (step 0, zero moments in the
/// parameter's memory format) when the parameter has none yet.
inline torch::optim::AdamWParamState& adamw_state(torch::optim::AdamW& optimizer, const torch::Tensor& param,
                                                  bool amsgrad) {
  auto& slot = optimizer.state()[optimizer_state_key(param)];
  if (!slot) {
    auto state = std::make_unique<torch::optim::AdamWParamState>();
    state->step(0);
    state->exp_avg(torch::zeros_like(param, torch::MemoryFormat::Preserve));
    state->exp_avg_sq(torch::zeros_like(param, torch::MemoryFormat::Preserve));
    if (amsgrad) state->max_exp_avg_sq(torch::zeros_like(param, torch::MemoryFormat::Preserve));
    slot = std::move(state);
  }
  return static_cast<torch::optim::AdamWParamState&>(*slot);
}

/// torch::optim::AdamW's step for one parameter, with its tensor operations: the path for what the fused kernel
/// does not take (CUDA, bf16, moments laid out unlike the parameter, amsgrad).
inline void adamw_tensor_step(torch::Tensor& param, const torch::Tensor& grad, torch::optim::AdamWParamState& state,
                              const torch::optim::AdamWOptions& options) {
  if (options.weight_decay() != 0) param.mul_(1 - options.lr() * options.weight_decay());
  state.step(state.step() + 1);
  const double b1 = std::get<0>(options.betas()), b2 = std::get<1>(options.betas());
  const double bias1 = 1 - std::pow(b1, static_cast<double>(state.step()));
  const double bias2 = 1 - std::pow(b2, static_cast<double>(state.step()));
  auto& exp_avg = state.exp_avg();
  auto& exp_avg_sq = state.exp_avg_sq();
  exp_avg.mul_(b1).add_(grad, 1 - b1);
  exp_avg_sq.mul_(b2).addcmul_(grad, grad, 1 - b2);
  torch::Tensor denom;
  if (options.amsgrad()) {
    auto& max_exp_avg_sq = state.max_exp_avg_sq();
    if (!max_exp_avg_sq.defined()) max_exp_avg_sq = torch::zeros_like(param, torch::MemoryFormat::Preserve);
    torch::max_out(max_exp_avg_sq, exp_avg_sq, max_exp_avg_sq);
    denom = (max_exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(options.eps());
  } else {
    denom = (exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(options.eps());
  }
  param.addcdiv_(exp_avg, denom, -(options.lr() / bias1));
}

/// Marks `t` as changed in place, as a tensor operation would (autograd then refuses a backward through a graph
/// that saved the old value).
inline void bump_version(const torch::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

/// The defined gradients among `params` that one threaded pass can take (CPU fp32, one dense block of memory) as
/// runs of at most kFusedAdamWChunk values; the other defined gradients are appended to `other`.
inline std::vector<std::pair<float*, int64_t>> gradient_chunks(const std::vector<torch::Tensor>& params,
                                                               std::vector<torch::Tensor>& other) {
  std::vector<std::pair<float*, int64_t>> chunks;
  for (const auto& p : params) {
    const auto& g = p.grad();
    if (!g.defined()) continue;
    if (!g.device().is_cpu() || g.scalar_type() != torch::kFloat || g.layout() != torch::kStrided ||
        !g.is_non_overlapping_and_dense()) {
      other.push_back(g);
      continue;
    }
    float* data = g.data_ptr<float>();
    for (int64_t begin = 0, n = g.numel(); begin < n; begin += kFusedAdamWChunk)
      chunks.emplace_back(data + begin, std::min(kFusedAdamWChunk, n - begin));
  }
  return chunks;
}

/// The sum of the squares of `n` fp32 values, summed in fp32 lanes and returned in double. Portable version.
inline double sum_of_squares_portable(const float* x, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += x[i + j] * x[i + j];
  double total = 0;
  for (float lane : lanes) total += lane;
  for (; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

#if defined(__GNUC__) && defined(__x86_64__)
/// sum_of_squares_portable() with AVX2 and FMA: four accumulators of eight lanes, bound by memory bandwidth.
__attribute__((target("avx2,fma"))) inline double sum_of_squares_avx2(const float* x, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
      acc[j] = _mm256_fmadd_ps(v, v, acc[j]);
    }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  double total = 0;
  for (float lane : lanes) total += lane;
  for (; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}
#endif

/// The global L2 norm of the defined gradients among `params`: CPU fp32 dense gradients in one pass over
/// `threads` threads (chunks of kFusedAdamWChunk values, each summed in fp32 and the chunks in double), the rest with
/// torch's norms (one per tensor, as torch::nn::utils::clip_grad_norm_ takes them). The same norm as
/// clip_grad_norm_'s up to the order of the fp32 sums; a gradient of inf or NaN gives inf or NaN.
inline double gradient_norm(const std::vector<torch::Tensor>& params, int threads) {
  std::vector<torch::Tensor> other;
  const auto chunks = gradient_chunks(params, other);
  for (auto& g : other) g = g.norm(2).to(torch::kFloat);  // bf16 gradients' norms stack with fp32 ones
  auto kernel = sum_of_squares_portable;
#if defined(__GNUC__) && defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernel = sum_of_squares_avx2;
#endif
  std::vector<double> sums(chunks.size());
  run_chunks(static_cast<int64_t>(chunks.size()), threads, [&](int64_t i) {
    const auto [data, size] = chunks[static_cast<size_t>(i)];
    sums[static_cast<size_t>(i)] = kernel(data, size);
  });
  double total = 0;
  for (double s : sums) total += s;
  if (!other.empty()) {
    const double norm = torch::stack(other).norm(2).item<double>();
    total += norm * norm;
  }
  return std::sqrt(total);
}

/// Multiplies every defined gradient among `params` by `factor`: CPU fp32 dense gradients in one pass over
/// `threads` threads, the rest with mul_.
inline void scale_gradients(const std::vector<torch::Tensor>& params, float factor, int threads) {
  std::vector<torch::Tensor> other;
  const auto chunks = gradient_chunks(params, other);
  for (auto& g : other) g.mul_(factor);
  for (const auto& p : params)
    if (p.grad().defined()) bump_version(p.grad());
  run_chunks(static_cast<int64_t>(chunks.size()), threads, [&](int64_t i) {
    auto [data, size] = chunks[static_cast<size_t>(i)];
    for (int64_t j = 0; j < size; ++j) data[j] *= factor;
  });
}

/// One AdamW step of every parameter of `optimizer` that has a gradient (the others are skipped, as
/// torch::optim::AdamW skips them), with the optimiser's own state (exp_avg, exp_avg_sq, step) and group options:
/// fused over `threads` threads for CPU fp32 parameters, torch's tensor operations otherwise. The state is the one
/// torch::optim::AdamW keeps, so its save() / load() and anything reading the state are unchanged. Every gradient
/// is taken times `grad_scale` (a clip factor not yet applied), exactly as if it had been multiplied in place first.
inline void adamw_step(torch::optim::AdamW& optimizer, int threads, float grad_scale = 1) {
  torch::NoGradGuard no_grad;
  std::vector<std::unique_ptr<FusedAdamWCoefficients>> coefficients;
  std::vector<FusedAdamWChunk> chunks;
  std::vector<torch::Tensor> changed;
  for (auto& group : optimizer.param_groups()) {
    auto& options = static_cast<torch::optim::AdamWOptions&>(group.options());
    for (auto& param : group.params()) {
      const auto& grad = param.grad();
      if (!grad.defined()) continue;
      if (grad.is_sparse())
        fail("GroupedAdamW: AdamW does not support sparse gradients (a parameter of shape {} has one)",
             format_shape(param.sizes()));
      auto& state = adamw_state(optimizer, param, options.amsgrad());
      if (options.amsgrad() || !fused_adamw_applies(param, grad, state.exp_avg(), state.exp_avg_sq())) {
        adamw_tensor_step(param, grad_scale != 1 ? grad * grad_scale : grad, state, options);
        continue;
      }
      state.step(state.step() + 1);
      coefficients.push_back(
          std::make_unique<FusedAdamWCoefficients>(FusedAdamWCoefficients::at_step(options, state.step())));
      coefficients.back()->grad_scale = grad_scale;
      auto* p = param.data_ptr<float>();
      const auto* g = grad.data_ptr<float>();
      auto* m = state.exp_avg().data_ptr<float>();
      auto* v = state.exp_avg_sq().data_ptr<float>();
      for (int64_t begin = 0, n = param.numel(); begin < n; begin += kFusedAdamWChunk)
        chunks.push_back({p + begin, g + begin, m + begin, v + begin, std::min(kFusedAdamWChunk, n - begin),
                          coefficients.back().get()});
      changed.insert(changed.end(), {param, state.exp_avg(), state.exp_avg_sq()});
    }
  }
  run_fused_adamw(chunks, threads);
  for (const auto& t : changed) bump_version(t);
}

}  // namespace detail

/// AdamW with named parameter groups, each with a peak learning rate that a schedule scales.
/// Build with add() / add_gpt2(), then build(); only parameters with requires_grad are added.
class GroupedAdamW {
 public:
  /// `weight_decay`, `betas`, `eps` apply to every group (torch's AdamW defaults: 0.01, (0.9, 0.999), 1e-8).
  explicit GroupedAdamW(double weight_decay = 0.01, std::pair<double, double> betas = {0.9, 0.999},
                        double eps = 1e-8)
      : weight_decay_(weight_decay), betas_(betas), eps_(eps) {}

  /// Adds one group of the trainable tensors among `params` at peak rate `lr`; an all-frozen group is left out.
  GroupedAdamW& add(std::string name, const std::vector<torch::Tensor>& params, double lr) {
    if (optimizer_) detail::fail("GroupedAdamW: add() after build()");
    std::vector<torch::Tensor> trainable;
    for (const auto& p : params)
      if (p.requires_grad()) trainable.push_back(p);
    if (trainable.empty()) return *this;
    names_.push_back(std::move(name));
    peak_lrs_.push_back(lr);
    groups_.push_back(std::move(trainable));
    return *this;
  }

  /// Adds the trainable parameters of a GPT-2-style model (names "transformer.wte", "transformer.h.{i}.", ...) as
  /// one group per depth: embeddings (depth 0), each block (1 .. n_layer), the rest (n_layer + 1); depth d learns at
  /// `lr` x `layer_decay`^(n_layer + 1 - d), so 1 gives the whole model one rate.
  template <class Model>
  GroupedAdamW& add_gpt2(const Model& model, double lr, double layer_decay = 1.0, const std::string& prefix = "") {
    const int64_t n_layer = model.config().n_layer;
    std::vector<std::vector<torch::Tensor>> by_depth(n_layer + 2);
    for (const auto& item : model.named_parameters())
      by_depth[gpt2_depth(item.key(), n_layer)].push_back(item.value());
    for (int64_t depth = 0; depth <= n_layer + 1; ++depth)
      add(prefix + (depth == 0 ? "embeddings" : depth <= n_layer ? "h." + std::to_string(depth - 1) : "final"),
          by_depth[depth], lr * std::pow(layer_decay, static_cast<double>(n_layer + 1 - depth)));
    return *this;
  }

  /// Creates the optimiser; fails when no parameter is trainable. `who` names the trainer in the message.
  GroupedAdamW& build(const std::string& who) {
    if (groups_.empty()) detail::fail("{}: the model has no trainable parameters (all frozen?)", who);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    for (size_t i = 0; i < groups_.size(); ++i) {
      parameters_.insert(parameters_.end(), groups_[i].begin(), groups_[i].end());
      auto options = std::make_unique<torch::optim::AdamWOptions>(peak_lrs_[i]);
      options->weight_decay(weight_decay_).betas({betas_.first, betas_.second}).eps(eps_);
      groups.emplace_back(groups_[i], std::move(options));
    }
    optimizer_ = std::make_unique<torch::optim::AdamW>(std::move(groups));
    return *this;
  }

  /// Sets every group's learning rate to its peak rate x `scale`.
  void set_scale(double scale) {
    auto& groups = optimizer().param_groups();
    for (size_t i = 0; i < groups.size(); ++i)
      static_cast<torch::optim::AdamWOptions&>(groups[i].options()).lr(peak_lrs_[i] * scale);
  }

  /// Drops the optimised parameters' gradients (torch 2.x's `zero_grad(set_to_none=True)`): the next backward
  /// then hands each parameter its gradient instead of adding it to zeros, which saves a fill and an add over every
  /// parameter per step (17% of a bf16 GPT-2-small learning step here). A parameter that gets no gradient before the
  /// next step() is skipped by it, as torch's optimisers skip it.
  void zero_grad() {
    for (auto& p : parameters_) p.mutable_grad().reset();
    pending_scale_ = 1;
  }

  /// Clips the global gradient norm of the optimised parameters to `max_norm` (0 = no clipping) and returns the
  /// norm before clipping: torch::nn::utils::clip_grad_norm_'s norm (up to the order of its fp32 sums; one pass
  /// over the CPU fp32 gradients instead of a norm per tensor) and factor (clip_coefficient()). With `defer_scale`
  /// the gradients are left as they are and step(), which must come next, takes them times the factor: the same
  /// update, one pass over the gradients fewer. Trainers defer when no step callback reads the clipped gradients.
  double clip_grad_norm(double max_norm, bool defer_scale = false) {
    const int threads = at::get_num_threads();
    const double norm = detail::gradient_norm(parameters_, threads);
    const auto factor = static_cast<float>(clip_coefficient(max_norm, norm));
    if (factor < 1) {
      if (defer_scale)
        pending_scale_ = factor;
      else
        detail::scale_gradients(parameters_, factor, threads);
    }
    return norm;
  }

  /// One AdamW step of the parameters that have a gradient: the fused CPU step for fp32 parameters, torch's
  /// operations for the rest (see detail::adamw_step); the same results and state as optimizer().step() (after a
  /// deferred clip, as after clipping the gradients first).
  void step() {
    detail::adamw_step(optimizer(), at::get_num_threads(), pending_scale_);
    pending_scale_ = 1;
  }

  /// The optimiser (after build()): its groups, options and per-parameter state (exp_avg, exp_avg_sq, step) are
  /// the ones step() uses.
  torch::optim::AdamW& optimizer() {
    if (!optimizer_) detail::fail("GroupedAdamW: build() has not been called");
    return *optimizer_;
  }
  /// Every optimised parameter, in group order.
  const std::vector<torch::Tensor>& parameters() const { return parameters_; }
  /// Group names, in order ("embeddings", "h.0", ..., "final", then the caller's).
  const std::vector<std::string>& group_names() const { return names_; }
  /// Peak learning rate of each group.
  const std::vector<double>& peak_learning_rates() const { return peak_lrs_; }

  /// Writes the optimiser state (moments, step counts, group options) to `path` (torch's archive format). Write
  /// into a checkpoint's temporary folder: the file itself is not written atomically.
  void save(const std::filesystem::path& path) {
    torch::serialize::OutputArchive archive;
    optimizer().save(archive);
    archive.save_to(path.string());
  }

  /// Restores the state saved by save() into an optimiser built over the same parameter groups.
  void load(const std::filesystem::path& path) {
    if (!std::filesystem::exists(path)) detail::fail("optimizer state: {}: no such file", path.string());
    torch::serialize::InputArchive archive;
    try {
      archive.load_from(path.string());
      optimizer().load(archive);
    } catch (const c10::Error& e) {
      detail::fail("optimizer state: {}: cannot load ({}) ---> HINT: the checkpoint must come from a run with the "
                   "same model, adapters and frozen layers",
                   path.string(), e.what_without_backtrace());
    }
  }

 private:
  double weight_decay_;
  std::pair<double, double> betas_;
  double eps_;
  std::vector<std::string> names_;
  std::vector<double> peak_lrs_;
  std::vector<std::vector<torch::Tensor>> groups_;
  std::vector<torch::Tensor> parameters_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  float pending_scale_ = 1;  // a clip factor clip_grad_norm() left for step()
};

}  // namespace rlhf
