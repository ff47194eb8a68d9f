#pragma once
// Include this, not doctest.h, in every test file: LibTorch pulls in glog, whose CHECK / CHECK_EQ / ... macros abort
// the process instead of recording a failed assertion. Torch comes first here and doctest's macros replace glog's.

#include <torch/torch.h>

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE
#undef CHECK_NOTNULL
#include <doctest/doctest.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <string_view>

#include <unistd.h>

#include <rlhf/core/small_matmul.hpp>

namespace rlhf::test {

/// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("rlhf-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  /// A path inside the directory.
  std::filesystem::path operator/(std::string_view name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// Puts the CPU kernels (decode, GELU, softmax statistics) back to the CPU's best when a test ends, after it capped
/// them with set_decode_isa().
struct RestoreDecodeIsa {
  ~RestoreDecodeIsa() { rlhf::set_decode_kernels(true); }
};

}  // namespace rlhf::test
