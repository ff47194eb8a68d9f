#pragma once
/// @file Mixed precision: bf16 autocast on CPU (AMX) and CUDA, with fp32 master weights and optimiser state.

#include <atomic>
#include <string>
#include <string_view>

#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Precision of the forward passes. Weights, gradients and optimiser state stay fp32 in every mode; layernorms,
/// softmax / log-softmax and the losses run in fp32 (the model upcasts before them).
enum class Precision {
  fp32,       ///< everything in fp32
  bf16,       ///< matmuls and linear layers in bf16 under autocast (CPU: AMX where present; CUDA: tensor cores)
  automatic,  ///< "auto", the trainers' default: bf16 where the device computes bf16 products natively, else fp32
              ///< (resolve_precision)
};

/// "fp32" / "bf16" / "auto".
inline std::string_view to_string(Precision p) {
  return p == Precision::bf16 ? "bf16" : p == Precision::automatic ? "auto" : "fp32";
}

/// Parses "fp32" / "float32" / "bf16" / "bfloat16" / "auto"; anything else is an error naming `field`.
inline Precision parse_precision(std::string_view name, std::string_view field = "precision") {
  if (name == "fp32" || name == "float32") return Precision::fp32;
  if (name == "bf16" || name == "bfloat16") return Precision::bf16;
  if (name == "auto") return Precision::automatic;
  detail::fail("{}: '{}' is not a precision (expected fp32, bf16 or auto)", field, name);
}

/// Whether `device` computes bf16 products natively, so that bf16 autocast speeds a forward up rather than adding
/// casts: a CPU with AVX512-BF16 (Intel from Cooper Lake, with AMX from Sapphire Rapids; AMD from Zen 4), a CUDA
/// GPU of compute capability 8.0 or later (Ampere and later: bf16 tensor cores; the check is LibTorch's, made with
/// cuDNN). Other devices: false.
inline bool native_bf16(torch::Device device) {
  if (device.is_cuda()) return at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8();
#if defined(__GNUC__) && defined(__x86_64__)
  if (device.is_cpu()) return __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

namespace detail {
inline std::atomic<Precision>& automatic_precision_pin() {
  static std::atomic<Precision> pinned{Precision::automatic};
  return pinned;
}
}  // namespace detail

/// Pins what Precision::automatic resolves to in this process, on every device: fp32 or bf16 (e.g. a test suite
/// that wants the same numerics on every CPU); Precision::automatic restores the choice by device.
inline void set_automatic_precision(Precision p) { detail::automatic_precision_pin() = p; }

/// The precision `p` runs in on `device`: fp32 and bf16 as they are; Precision::automatic as pinned by
/// set_automatic_precision(), else bf16 where native_bf16(device), fp32 elsewhere.
inline Precision resolve_precision(Precision p, torch::Device device) {
  if (p != Precision::automatic) return p;
  if (const auto pinned = detail::automatic_precision_pin().load(); pinned != Precision::automatic) return pinned;
  return native_bf16(device) ? Precision::bf16 : Precision::fp32;
}

// at::autocast's state per device type: torch 2.4 and later take the device type, earlier versions name CPU and
// CUDA ("gpu") in the function.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
/// Whether autocast is on for `device` (torch::kCPU or torch::kCUDA) in this thread.
inline bool autocast_enabled(c10::DeviceType device) { return at::autocast::is_autocast_enabled(device); }
/// The dtype autocast casts to on `device`.
inline at::ScalarType autocast_dtype(c10::DeviceType device) { return at::autocast::get_autocast_dtype(device); }
namespace detail {
inline void set_autocast(c10::DeviceType device, bool enabled, at::ScalarType dtype) {
  at::autocast::set_autocast_enabled(device, enabled);
  at::autocast::set_autocast_dtype(device, dtype);
}
}  // namespace detail
#else
inline bool autocast_enabled(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled();
}
inline at::ScalarType autocast_dtype(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                         : at::autocast::get_autocast_cpu_dtype();
}
namespace detail {
inline void set_autocast(c10::DeviceType device, bool enabled, at::ScalarType dtype) {
  if (device == c10::DeviceType::CUDA) {
    at::autocast::set_enabled(enabled);
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_cpu_enabled(enabled);
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
}
}  // namespace detail
#endif

/// RAII scope that turns bf16 autocast on for `device`'s type (CPU or CUDA) when `precision` is bf16 (or automatic
/// and resolve_precision() makes it bf16 on `device`), and restores the previous autocast state on exit. Nestable;
/// a no-op for fp32. Run forwards inside it and call backward() outside (autograd replays the casts).
class AutocastScope {
 public:
  AutocastScope(Precision precision, torch::Device device)
      : active_(resolve_precision(precision, device) == Precision::bf16),
        device_(device.is_cuda() ? c10::DeviceType::CUDA : c10::DeviceType::CPU) {
    if (!active_) return;
    was_enabled_ = autocast_enabled(device_);
    previous_dtype_ = autocast_dtype(device_);
    detail::set_autocast(device_, true, torch::kBFloat16);
    at::autocast::increment_nesting();
  }

  ~AutocastScope() {
    if (!active_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();  // drop cached bf16 weight copies
    detail::set_autocast(device_, was_enabled_, previous_dtype_);
  }

  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool active_;
  c10::DeviceType device_;
  bool was_enabled_ = false;
  at::ScalarType previous_dtype_ = torch::kBFloat16;
};

}  // namespace rlhf
