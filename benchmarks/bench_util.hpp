#pragma once
/// @file What the benchmark programs share: timing, the machine's copy bandwidth and matmul ceiling measured in the
/// same run (on the CPU or a CUDA device), resident memory from /proc/self and a CUDA device's allocator,
/// GPT-2 FLOP counts, and a tokenizer with a GPT-2-sized vocabulary that needs no downloaded files.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <torch/torch.h>
#ifdef RLHF_BENCH_CUDA  // benchmarks/CMakeLists.txt defines it when LibTorch is built with CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <rlhf/rlhf.hpp>

namespace rlhf::bench {

// ---- the library's CPU kernels ----

/// rlhf::DecodeIsa's values by name.
inline const std::map<std::string, DecodeIsa>& decode_isas() {
  static const std::map<std::string, DecodeIsa> isas{{"avx512_bf16", DecodeIsa::avx512_bf16},
                                                     {"avx512", DecodeIsa::avx512},
                                                     {"avx2", DecodeIsa::avx2},
                                                     {"none", DecodeIsa::none}};
  return isas;
}

/// The name of `isa`.
inline std::string decode_isa_name(DecodeIsa isa) {
  for (const auto& [name, value] : decode_isas())
    if (value == isa) return name;
  return "?";
}

/// Adds --decode-isa to `app`: the best instruction set the library's CPU kernels (decoding, GELU, softmax
/// statistics, the AVX-512 products) may use, for rlhf::set_decode_isa(); `none` runs torch's operators only.
inline CLI::Option* add_decode_isa_option(CLI::App& app, DecodeIsa& cap) {
  return app
      .add_option("--decode-isa", cap,
                  "the best instruction set the library's CPU kernels may use (rlhf::set_decode_isa); none = torch's "
                  "operators only")
      ->transform(CLI::CheckedTransformer(decode_isas()))
      ->default_str("avx512_bf16");
}

// ---- timing and machine probes ----

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Copy bandwidth of `device` in bytes/s: read + write of a `bytes` buffer (256 MiB by default, far beyond the
/// caches), best of 5. A decoding step that reads every weight once cannot beat weight bytes / this.
inline double copy_bandwidth(torch::Device device = torch::kCPU, int64_t bytes = int64_t{256} << 20) {
  auto src = torch::ones({bytes / 4}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  auto dst = torch::empty_like(src);
  dst.copy_(src);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    synchronize(device);
    auto start = std::chrono::steady_clock::now();
    dst.copy_(src);
    synchronize(device);
    best = std::min(best, seconds_since(start));
  }
  return 2.0 * static_cast<double>(src.nbytes()) / best;
}

/// Achieved FLOP/s of one [m, k] x [k, n] product in `dtype` on `device`, best of `repeats` after one warm-up call:
/// torch's matmul (CPU fp32: OpenBLAS; CPU bf16: oneDNN; CUDA: cuBLAS), or with `library` the library's CPU
/// kernels (rlhf::gemm_addmm, rlhf::gemm_bf16_addmm; 0 where they do not apply).
inline double matmul_flops(torch::ScalarType dtype, int64_t m, int64_t k, int64_t n, torch::Device device = torch::kCPU,
                           bool library = false, int repeats = 5) {
  auto a = torch::randn({m, k}).to(device, dtype);
  auto b = torch::randn({k, n}).to(device, dtype);
  const bool bf16 = dtype == torch::kBFloat16;
  if (library && !(bf16 ? gemm_bf16_applies({&a, &b}) : gemm_applies({&a, &b}))) return 0.0;
  const auto product = [&] {
    if (!library) return torch::matmul(a, b);
    return bf16 ? gemm_bf16_addmm({}, a, b, dtype) : gemm_addmm({}, a, b);
  };
  auto c = product();
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    synchronize(device);
    auto start = std::chrono::steady_clock::now();
    c = product();
    synchronize(device);
    best = std::min(best, seconds_since(start));
  }
  return 2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n) / best;
}

/// One matmul shape of the ceiling probe and what it reached.
struct MatmulPoint {
  int64_t m = 0, k = 0, n = 0;
  double flops = 0;          ///< FLOP/s, torch's matmul
  double library_flops = 0;  ///< FLOP/s, the library's kernels (0 where they do not apply)
};

/// The machine's matmul ceiling in `dtype` (FLOP/s): the best of the GEMMs a GPT-2 training step is made of
/// (`d_model` wide: use 768 or more, small widths do not reach the machine's ceiling), with `rows` = minibatch
/// tokens (e.g. 8 x 66 = 528) and a large 2048-row case, each by torch's matmul and by the library's fp32 kernels
/// where they apply (they outrun OpenBLAS where it runs AVX2 kernels on an AVX-512 CPU). `points` receives every
/// shape.
inline double matmul_ceiling(torch::ScalarType dtype, int64_t d_model, int64_t rows,
                             std::vector<MatmulPoint>* points = nullptr, torch::Device device = torch::kCPU) {
  const std::vector<std::array<int64_t, 3>> shapes = {
      {rows, d_model, 3 * d_model}, {rows, d_model, 4 * d_model}, {rows, 4 * d_model, d_model},
      {2048, d_model, 4 * d_model}, {2048, 4 * d_model, d_model}};
  double best = 0;
  for (const auto& [m, k, n] : shapes) {
    const MatmulPoint point{m, k, n, matmul_flops(dtype, m, k, n, device),
                            matmul_flops(dtype, m, k, n, device, /*library=*/true)};
    if (points) points->push_back(point);
    best = std::max({best, point.flops, point.library_flops});
  }
  return best;
}

// ---- memory ----

/// A field of /proc/self/status in MiB ("VmRSS": resident now, "VmHWM": peak resident since start or the last
/// reset_peak_rss()); 0 where the file is unreadable.
inline double proc_status_mb(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;  // kB
  return 0.0;
}

/// Resident memory now (MiB): the second field of /proc/self/statm (pages; the same count as VmRSS), read through a
/// descriptor kept open. MemorySampler calls it every millisecond, where opening and parsing /proc/self/status each
/// time took a sizeable share of a core. 0 where unreadable.
inline double rss_mb() {
  static const int fd = ::open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  static const double page_mb = static_cast<double>(::sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
  std::array<char, 128> text{};
  const ssize_t n = fd < 0 ? -1 : ::pread(fd, text.data(), text.size() - 1, 0);
  unsigned long long size = 0, resident = 0;
  if (n <= 0 || std::sscanf(text.data(), "%llu %llu", &size, &resident) != 2) return 0.0;
  return static_cast<double>(resident) * page_mb;
}
inline double peak_rss_mb() { return proc_status_mb("VmHWM"); }

/// Resets VmHWM to the current RSS (Linux: "5" into /proc/self/clear_refs). False where not allowed.
inline bool reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
}

/// Whether this build can read a CUDA device's allocator statistics (LibTorch with CUDA).
inline constexpr bool kDeviceMemoryStats =
#ifdef RLHF_BENCH_CUDA
    true;
#else
    false;
#endif

/// MiB allocated by torch on CUDA `device` now (`peak` false) or at most since the last reset_device_peak
/// (`peak` true); 0 for the CPU or without kDeviceMemoryStats.
inline double device_allocated_mb(torch::Device device, bool peak = false) {
#ifdef RLHF_BENCH_CUDA
  if (device.is_cuda()) {
    namespace alloc = c10::cuda::CUDACachingAllocator;
    const auto stats = alloc::getDeviceStats(device.has_index() ? device.index() : 0);
    const auto& bytes = stats.allocated_bytes[0];  // StatType::AGGREGATE
    return static_cast<double>(peak ? bytes.peak : bytes.current) / (1024.0 * 1024.0);
  }
#endif
  return 0.0;
}

/// Resets the peak that device_allocated_mb(device, true) reports.
inline void reset_device_peak(torch::Device device) {
#ifdef RLHF_BENCH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.has_index() ? device.index() : 0);
#endif
}

/// malloc's heap (MiB): bytes the program holds, and bytes malloc holds free. tcmalloc: its page heap's free pages
/// still mapped plus the free objects in its central, transfer and per-thread caches, all of it memory tcmalloc took
/// from the system for earlier allocations, so resident; glibc: freed chunks and the top chunk of every arena,
/// touched or not, so not a measure of resident memory. Zeros where neither is readable (glibc before 2.33 lacks
/// mallinfo2).
struct HeapUsage {
  double in_use_mb = 0, free_mb = 0;
};

inline HeapUsage heap_usage() {
  constexpr double kMiB = 1024.0 * 1024.0;
  if (rlhf::detail::malloc_is_tcmalloc()) {
    using Property = int (*)(const char*, size_t*);
    static const auto property = reinterpret_cast<Property>(dlsym(RTLD_DEFAULT, "MallocExtension_GetNumericProperty"));
    size_t in_use = 0, free = 0;
    if (!property || !property("generic.current_allocated_bytes", &in_use)) return {};
    for (const char* name : {"tcmalloc.pageheap_free_bytes", "tcmalloc.central_cache_free_bytes",
                             "tcmalloc.transfer_cache_free_bytes", "tcmalloc.thread_cache_free_bytes"}) {
      size_t bytes = 0;
      if (!property(name, &bytes)) return {};
      free += bytes;
    }
    return {static_cast<double>(in_use) / kMiB, static_cast<double>(free) / kMiB};
  }
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 m = ::mallinfo2();
  return {static_cast<double>(m.uordblks + m.hblkhd) / kMiB, static_cast<double>(m.fordblks) / kMiB};
#else
  return {};
#endif
}

/// Samples a memory probe (default: resident memory, in MiB) every `period` on a thread, so that the peak of each
/// stage of a call that runs several stages (PPOTrainer::step) can be read afterwards from the stage's time window.
/// With `heap` set, samples also record malloc's heap (heap_usage), so that the peak can be split into what the
/// program held and what malloc kept: every sample that sets a new maximum of the probe (so the peak always has
/// its heap), and otherwise one every kHeapEvery. tcmalloc's statistics walk its free lists under the locks the
/// program's threads allocate through; read every millisecond they took ~4% of a core, on a machine whose cores
/// the measured threads fill.
class MemorySampler {
 public:
  /// One sample: seconds since the start, the probe's MiB, and the heap at that moment (`has_heap`; zeros without).
  struct Sample {
    double t = 0, mb = 0;
    HeapUsage heap;
    bool has_heap = false;
  };

  /// The longest stretch between two heap readings while the probe sets no new maximum.
  static constexpr std::chrono::milliseconds kHeapEvery{20};

  explicit MemorySampler(std::chrono::microseconds period = std::chrono::microseconds(1000),
                         std::function<double()> probe = rss_mb, bool heap = false)
      : period_(period), probe_(std::move(probe)), heap_(heap) {
    start_ = std::chrono::steady_clock::now();
    thread_ = std::thread([this] {
      double highest = -1;
      auto heap_read = start_ - kHeapEvery;
      while (!stop_.load()) {
        Sample sample{.t = seconds_since(start_), .mb = probe_()};
        const auto now = std::chrono::steady_clock::now();
        if (heap_ && (sample.mb > highest || now - heap_read >= kHeapEvery)) {
          sample.heap = heap_usage();
          sample.has_heap = true;
          heap_read = now;
        }
        highest = std::max(highest, sample.mb);
        {
          std::lock_guard lock(mutex_);
          samples_.push_back(sample);
        }
        std::this_thread::sleep_for(period_);
      }
    });
  }
  ~MemorySampler() { stop(); }
  MemorySampler(const MemorySampler&) = delete;
  MemorySampler& operator=(const MemorySampler&) = delete;

  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

  /// Seconds from the sampler's start to `t`.
  double offset(std::chrono::steady_clock::time_point t) const {
    return std::chrono::duration<double>(t - start_).count();
  }

  /// Largest sampled value (MiB) in [from, to] seconds after the start; for a window shorter than the period, the
  /// last sample before `to`.
  double max_between(double from, double to) const {
    std::lock_guard lock(mutex_);
    double best = 0, before = 0;
    for (const auto& s : samples_) {
      if (s.t >= from && s.t <= to) best = std::max(best, s.mb);
      if (s.t <= to) before = s.mb;
    }
    return best > 0 ? best : before;
  }

  /// The largest heap in use over the samples that read it (MiB; 0 without `heap`).
  double max_heap_in_use() const {
    std::lock_guard lock(mutex_);
    double best = 0;
    for (const auto& s : samples_) best = std::max(best, s.heap.in_use_mb);
    return best;
  }

  /// Every sample so far, in time order.
  std::vector<Sample> samples() const {
    std::lock_guard lock(mutex_);
    return samples_;
  }

  /// The sample with the largest value (the first of equal ones, which read the heap when the sampler does); a zero
  /// sample when there is none.
  Sample peak() const {
    std::lock_guard lock(mutex_);
    Sample best;
    for (const auto& s : samples_)
      if (s.mb > best.mb) best = s;
    return best;
  }

 private:
  std::chrono::microseconds period_;
  std::function<double()> probe_;
  bool heap_;
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mutex_;
  std::vector<Sample> samples_;
  std::thread thread_;
};

// ---- GPT-2 FLOP counts (2 FLOPs per multiply-add; matmuls only) ----

/// Forward FLOPs of the transformer blocks for `tokens` query positions each attending to `context` keys:
/// per layer and token 2 x 12 D^2 for the four projections (q/k/v 3D^2, out D^2, MLP 8D^2) plus 2 x 2 x context x D
/// for the scores and the weighted sum (the dense square both the library and eager PyTorch compute).
inline double block_flops(const GPT2Config& c, double tokens, double context) {
  const double d = static_cast<double>(c.n_embd), mlp = static_cast<double>(c.d_mlp());
  return 2.0 * tokens * static_cast<double>(c.n_layer) * (4.0 * d * d + 2.0 * d * mlp + 2.0 * context * d);
}

/// Forward FLOPs of the tied vocabulary projection at `positions` positions: 2 D V each.
inline double vocab_flops(const GPT2Config& c, double positions) {
  return 2.0 * positions * static_cast<double>(c.n_embd) * static_cast<double>(c.vocab_size);
}

/// Forward FLOPs of the MLP value head (D -> 4D -> 1) at `positions` positions.
inline double value_head_flops(const GPT2Config& c, double positions) {
  const double d = static_cast<double>(c.n_embd);
  return 2.0 * positions * (4.0 * d * d + 4.0 * d);
}

// ---- data without downloaded files ----

/// A tokenizer with `vocab_size` ids and no merges: the 256 byte tokens (GPT-2's ids for single bytes), placeholder
/// tokens "w256", "w257", ... (they decode to their text) and <|endoftext|> as the last id (50256 for 50257, like
/// GPT-2's). Every byte of a text is one token, so a prompt of n letters is n tokens.
inline GPT2Tokenizer placeholder_tokenizer(int64_t vocab_size = 50257) {
  auto vocab = GPT2Tokenizer::byte_level().vocab();
  vocab.erase("<|endoftext|>");
  for (int64_t id = 256; id < vocab_size - 1; ++id) vocab.emplace(fmt::format("w{}", id), id);
  vocab.emplace("<|endoftext|>", vocab_size - 1);
  return GPT2Tokenizer(std::move(vocab), {});
}

/// `n` prompts of `length` lowercase letters (one token each with placeholder_tokenizer()), the same in every run
/// and in benchmarks/python/ppo_phase.py: letter j of prompt i is 'a' + (7 i + 3 j + i j) mod 26.
inline std::vector<std::string> letter_prompts(int64_t n, int64_t length) {
  std::vector<std::string> prompts;
  for (int64_t i = 0; i < n; ++i) {
    std::string text;
    for (int64_t j = 0; j < length; ++j) text.push_back(static_cast<char>('a' + (7 * i + 3 * j + i * j) % 26));
    prompts.push_back(std::move(text));
  }
  return prompts;
}

/// The benchmarks' reward: the share of 'e' among the bytes of a completion (cheap, deterministic, and the same
/// function in benchmarks/python/ppo_phase.py).
inline double letter_e_share(const std::string& text) {
  if (text.empty()) return 0.0;
  return static_cast<double>(std::count(text.begin(), text.end(), 'e')) / static_cast<double>(text.size());
}

}  // namespace rlhf::bench
