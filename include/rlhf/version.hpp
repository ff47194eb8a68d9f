#pragma once
/// @file Library version.

namespace rlhf {
inline constexpr int kVersionMajor = 0;  ///< incompatible API changes
inline constexpr int kVersionMinor = 1;  ///< added features
inline constexpr int kVersionPatch = 0;  ///< fixes
inline constexpr const char* kVersion = "0.1.0";
}  // namespace rlhf
