#pragma once
/// @file Process-wide settings that decide CPU speed: threads, the BLAS in use, and how malloc treats big buffers.

#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <link.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <torch/cuda.h>
#include <torch/torch.h>

namespace rlhf {

/// What configure_runtime() should set.
struct RuntimeOptions {
  int threads = 0;           ///< intra-op threads for torch and OpenBLAS; 0 = every core (nproc), e.g. 2
  bool keep_memory = true;   ///< keep glibc malloc from returning big buffers to the OS after every op (nothing
                             ///< to do under tcmalloc, which keeps freed pages a while by itself)
};

/// What configure_runtime() found and set.
struct RuntimeInfo {
  int threads = 1;           ///< intra-op threads now in use
  std::string blas;          ///< the BLAS libraries loaded, e.g. ".../openblas-openmp/libblas.so.3, ..."
  bool blas_is_openmp_openblas = false;  ///< the fast choice on CPU (shares torch's OpenMP threads)
  bool malloc_tuned = false; ///< whether glibc malloc was told to keep big buffers
  std::string allocator;     ///< the process's malloc: "tcmalloc" (the project's programs link it) or "glibc"

  /// A line saying what is slow and how to fix it, or empty when the set-up is the fast one.
  std::string warning() const {
    if (blas_is_openmp_openblas || blas.empty()) return {};
    return "rlhf: the BLAS libraries loaded are " + blas +
           ", not all the OpenMP build of OpenBLAS; CPU matmuls and the ops between them may be many times slower. "
           "---> HINT: apt-get install libopenblas0-openmp, then update-alternatives --set for "
           "libblas.so.3-x86_64-linux-gnu and libopenblas.so.0-x86_64-linux-gnu to the files under "
           "/usr/lib/x86_64-linux-gnu/openblas-openmp/ (scripts/install-deps.sh does both)";
  }
};

namespace detail {

/// Real paths of the loaded shared objects whose names contain "blas", GPU BLAS libraries (cuBLAS, hipBLAS,
/// rocBLAS) left out. Debian's torch loads two: libblas.so.3 and libopenblas.so.0, each chosen by its own Debian
/// alternative, so both must point at the OpenMP build. (PyPI's torch links MKL statically: no CPU BLAS is found.)
inline std::vector<std::string> loaded_blas_paths() {
  std::vector<std::string> found;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        std::string name = info->dlpi_name ? info->dlpi_name : "";
        if (name.find("blas") == std::string::npos) return 0;
        for (const char* gpu : {"cublas", "hipblas", "rocblas"})
          if (name.find(gpu) != std::string::npos) return 0;
        static_cast<std::vector<std::string>*>(data)->push_back(name);
        return 0;
      },
      &found);
  for (auto& path : found) {
    std::error_code ec;  // the names are link chains through /etc/alternatives: name the real files
    if (auto real = std::filesystem::canonical(path, ec); !ec) path = real.string();
  }
  return found;
}

/// Whether the process's malloc is tcmalloc's (linked into the program or preloaded): the global `malloc` is
/// then tcmalloc's own entry point.
inline bool malloc_is_tcmalloc() {
  void* tc = dlsym(RTLD_DEFAULT, "tc_malloc");
  return tc && tc == dlsym(RTLD_DEFAULT, "malloc");
}

}  // namespace detail

/// Waits until the work queued on `device` has run (CUDA launches are asynchronous); nothing on the CPU. Host-clock
/// timings of GPU work call this at the end of what they time.
inline void synchronize(torch::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
}

/// Sets torch's and OpenBLAS's thread counts, tunes glibc malloc for large tensors (under tcmalloc there is nothing
/// to tune), and reports the BLAS and the malloc in use.
/// Call once at the start of a program (the library's tools do). Without it torch may run on one thread.
inline RuntimeInfo configure_runtime(const RuntimeOptions& options = {}) {
  RuntimeInfo info;
  info.threads = options.threads > 0 ? options.threads : static_cast<int>(std::thread::hardware_concurrency());
  if (info.threads < 1) info.threads = 1;
  torch::set_num_threads(info.threads);
  // OpenBLAS keeps its own thread count; torch's setting does not reach it.
  using SetThreads = void (*)(int);
  if (auto set_blas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    set_blas(info.threads);
  info.allocator = detail::malloc_is_tcmalloc() ? "tcmalloc" : "glibc";
#if defined(__GLIBC__)
  if (options.keep_memory && info.allocator == "glibc") {
    // Large tensors are otherwise mmap'ed and unmapped on every op: a page-fault storm on CPU training.
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_TOP_PAD, 64 << 20);
    info.malloc_tuned = true;
  }
#endif
  const auto paths = detail::loaded_blas_paths();
  info.blas_is_openmp_openblas = !paths.empty();
  for (const auto& path : paths) {
    if (!info.blas.empty()) info.blas += ", ";
    info.blas += path;
    if (path.find("openblas-openmp") == std::string::npos) info.blas_is_openmp_openblas = false;
  }
  return info;
}

}  // namespace rlhf
