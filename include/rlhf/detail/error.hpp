#pragma once
/// @file Error type of the library: every failure it reports is an rlhf::Error with context in its message.

#include <stdexcept>
#include <string>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace rlhf {

/// The exception the library throws for bad input and misuse. The message names the file, the field and what was
/// expected, e.g. "safetensors: model.safetensors: tensor 'h.0.attn.c_attn.weight' has shape [768, 2304], config
/// expects [768, 2307]".
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

/// Throws rlhf::Error with a fmt-formatted message.
template <class... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

/// "[2, 3]" for a shape (any range of integers: std::vector<int64_t>, torch's IntArrayRef), for error messages.
template <class Range>
std::string format_shape(const Range& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

}  // namespace detail
}  // namespace rlhf
