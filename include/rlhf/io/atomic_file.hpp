#pragma once
/// @file Crash-safe file output and whole-file input (POSIX).
///
/// write_file_atomic() and write_file_atomic_with() write to a fresh temporary file in the target's directory, flush
/// and fsync it, rename it over the target and fsync the directory. A reader sees either the old file or the complete
/// new one, never a torn write, even if the process dies or the machine loses power part way through. On failure the
/// temporary file is removed and the old target, if any, is left untouched.

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {
namespace detail {

// ---- errno helpers ----

/// Result of the XSI strerror_r (returns int): the message is in `buffer`.
inline const char* strerror_result(int result, const char* buffer) { return result == 0 ? buffer : "unknown error"; }

/// Result of the GNU strerror_r (returns char*): the message is the return value.
inline const char* strerror_result(const char* result, const char* /*buffer*/) { return result; }

/// The text strerror() gives for `error` ("No such file or directory"), without strerror()'s shared buffer.
inline std::string errno_text(int error) {
  char buffer[256] = {};
  return strerror_result(::strerror_r(error, buffer, sizeof(buffer)), buffer);
}

// ---- file descriptors ----

/// Owns a POSIX file descriptor and closes it on destruction.
class UniqueFd {
 public:
  /// Takes ownership of `fd` (-1 for none).
  explicit UniqueFd(int fd = -1) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  /// The descriptor, or -1.
  int get() const noexcept { return fd_; }
  /// Gives up ownership without closing and returns the descriptor.
  int release() noexcept { return std::exchange(fd_, -1); }
  /// Closes the descriptor (if any).
  void reset() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

/// Writes `size` bytes to `file`; on a short write throws rlhf::Error "{context}: write failed: {strerror}".
inline void write_all(std::FILE* file, const void* data, std::size_t size, std::string_view context) {
  if (size == 0) return;
  errno = 0;
  if (std::fwrite(data, 1, size, file) != size) {
    const int error = errno != 0 ? errno : EIO;
    fail("{}: write failed: {}", context, errno_text(error));
  }
}

// ---- temporary file next to the target ----

/// A temporary file in the directory of a target path, removed on destruction unless commit() renamed it over the
/// target. Used by write_file_atomic_with().
class AtomicTempFile {
 public:
  /// Creates `.{name}.tmp.{pid}.{random}` (mode 0666 less the umask) next to `target`.
  explicit AtomicTempFile(const std::filesystem::path& target) : target_(target) {
    const std::string name = target.filename().string();
    if (name.empty() || name == "." || name == "..") {
      fail("write_file_atomic: {}: not a path to a file", target.string());
    }
    directory_ = target.parent_path();
    if (directory_.empty()) directory_ = ".";
    // Keep the temporary name under NAME_MAX (255) even for a long target name.
    const std::string stem = name.substr(0, 200);
    std::random_device random;
    constexpr int kAttempts = 64;
    for (int attempt = 0; attempt < kAttempts; ++attempt) {
      const std::uint64_t salt = (std::uint64_t{random()} << 32) ^ std::uint64_t{random()};
      std::filesystem::path candidate =
          directory_ / fmt::format(".{}.tmp.{}.{:016x}", stem, static_cast<long>(::getpid()), salt);
      UniqueFd fd(::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
      if (fd.get() < 0) {
        const int error = errno;
        if (error == EEXIST) continue;
        fail("write_file_atomic: {}: cannot create a temporary file in '{}': {}", target.string(), directory_.string(),
             errno_text(error));
      }
      path_ = std::move(candidate);
      file_ = ::fdopen(fd.get(), "wb");
      if (file_ == nullptr) {
        const int error = errno;
        fd.reset();
        ::unlink(path_.c_str());
        fail("write_file_atomic: {}: cannot open a stream on '{}': {}", target.string(), path_.string(),
             errno_text(error));
      }
      fd.release();  // now owned by file_
      return;
    }
    fail("write_file_atomic: {}: cannot find an unused temporary file name in '{}' after {} attempts", target.string(),
         directory_.string(), kAttempts);
  }
  AtomicTempFile(const AtomicTempFile&) = delete;
  AtomicTempFile& operator=(const AtomicTempFile&) = delete;

  /// Closes and removes the temporary file unless commit() succeeded.
  ~AtomicTempFile() {
    if (file_ != nullptr) std::fclose(file_);
    if (!committed_) ::unlink(path_.c_str());
  }

  /// The stream to write the new contents to.
  std::FILE* file() const noexcept { return file_; }
  /// The temporary file's path.
  const std::filesystem::path& path() const noexcept { return path_; }

  /// Flushes and fsyncs the temporary file, renames it over the target and fsyncs the directory.
  void commit() {
    const std::string where = target_.string();
    if (std::ferror(file_)) {
      fail("write_file_atomic: {}: writing the temporary file '{}' failed: {}", where, path_.string(),
           errno_text(errno != 0 ? errno : EIO));
    }
    if (std::fflush(file_) != 0) {
      fail("write_file_atomic: {}: flushing '{}' failed: {}", where, path_.string(), errno_text(errno));
    }
    if (::fsync(::fileno(file_)) != 0) {
      fail("write_file_atomic: {}: fsync of '{}' failed: {}", where, path_.string(), errno_text(errno));
    }
    std::FILE* file = std::exchange(file_, nullptr);
    if (std::fclose(file) != 0) {
      fail("write_file_atomic: {}: closing '{}' failed: {}", where, path_.string(), errno_text(errno));
    }
    if (::rename(path_.c_str(), target_.c_str()) != 0) {
      fail("write_file_atomic: {}: cannot rename '{}' over it: {}", where, path_.string(), errno_text(errno));
    }
    committed_ = true;
    sync_directory();
  }

 private:
  // Makes the rename durable. Filesystems that cannot fsync a directory (EINVAL) are accepted as they are.
  void sync_directory() const {
    UniqueFd dir(::open(directory_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.get() < 0 || (::fsync(dir.get()) != 0 && errno != EINVAL)) {
      fail(
          "write_file_atomic: {}: written, but syncing the directory '{}' failed: {} (the new file may not "
          "survive a power loss)",
          target_.string(), directory_.string(), errno_text(errno));
    }
  }

  std::filesystem::path target_;
  std::filesystem::path directory_;
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

}  // namespace detail

// ---- public API ----

/// Replaces the file at `path` with the bytes `write(file)` writes, atomically: the writer fills a unique temporary
/// file in the same directory, which is then flushed, fsynced and renamed over `path`, and the directory is fsynced.
///
/// `Writer` must be callable as `void(std::FILE*)`; it writes the new contents with fwrite/fprintf and may throw to
/// abandon the write. Any failure (the writer throws, a write, the fsync or the rename fails) removes the temporary
/// file, leaves the old file at `path` as it was, and throws (an rlhf::Error naming the path and the errno text, or
/// the writer's own exception). The new file gets mode 0666 less the umask.
template <class Writer>
void write_file_atomic_with(const std::filesystem::path& path, Writer&& write) {
  static_assert(std::is_invocable_v<Writer&, std::FILE*>,
                "write_file_atomic_with: the writer must be callable as void(std::FILE*)");
  detail::AtomicTempFile temp(path);
  write(temp.file());
  temp.commit();
}

/// Replaces the file at `path` with `bytes`, atomically (see write_file_atomic_with()).
inline void write_file_atomic(const std::filesystem::path& path, std::string_view bytes) {
  write_file_atomic_with(path, [&](std::FILE* file) {
    detail::write_all(file, bytes.data(), bytes.size(), fmt::format("write_file_atomic: {}", path.string()));
  });
}

/// Reads the whole file at `path`. Throws rlhf::Error "read_file: {path}: cannot open: {strerror}" for a missing or
/// unreadable file and "read_file: {path}: read failed: {strerror}" for a failing read (e.g. a directory).
inline std::string read_file(const std::filesystem::path& path) {
  detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) detail::fail("read_file: {}: cannot open: {}", path.string(), detail::errno_text(errno));
  std::string bytes;
  struct stat info {};
  if (::fstat(fd.get(), &info) == 0 && S_ISREG(info.st_mode) && info.st_size > 0) {
    bytes.reserve(static_cast<std::size_t>(info.st_size));
  }
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof(buffer));
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      detail::fail("read_file: {}: read failed: {}", path.string(), detail::errno_text(errno));
    }
    bytes.append(buffer, static_cast<std::size_t>(n));
  }
  return bytes;
}

}  // namespace rlhf
