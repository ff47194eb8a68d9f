#pragma once
/// @file Text for a terminal: decoded samples may hold control characters and bytes that are not UTF-8.

#include <string>
#include <string_view>

#include <fmt/format.h>

namespace rlhf {

/// `text` made safe to print on one line: valid UTF-8 is kept, control characters (newlines included) become
/// spaces, and bytes that are not valid UTF-8 (an untrained byte-level model writes many) are shown as \xNN.
inline std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool valid = len > 0 && i + len <= text.size();
    for (size_t k = 1; valid && k < len; ++k) valid = (static_cast<unsigned char>(text[i + k]) >> 6) == 0x2;
    if (!valid) {
      out += fmt::format("\\x{:02x}", c);
      ++i;
    } else if (len == 1 && (c < 0x20 || c == 0x7f)) {
      out += ' ';
      ++i;
    } else {
      out.append(text.substr(i, len));
      i += len;
    }
  }
  return out;
}

}  // namespace rlhf
