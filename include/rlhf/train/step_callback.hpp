#pragma once
/// @file Step callbacks: hooks a trainer calls around each optimiser step, so that a recorder (rlhf::ShiftRecorder)
/// can observe the batch, the clipped gradients and the update without a second code path in the trainer.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// What a trainer tells its callbacks about the step in progress.
struct StepInfo {
  int64_t step = 0;                            ///< 0-based optimiser step
  torch::Tensor ids;                           ///< [B, T] token ids of the batch; row b is datum b
  torch::Tensor attention_mask;                ///< [B, T], nonzero = real token
  torch::Tensor loss_mask;                     ///< [B, T], nonzero = target token (undefined when not token-level)
  torch::optim::Optimizer* optimizer = nullptr;  ///< the optimiser that applies the update
  double grad_norm = 0;                        ///< global gradient norm before clipping (set from on_gradients on)
  double clip_coef = 1;                        ///< factor clipping multiplied every gradient by; 1 = not clipped
};

/// Hooks around one optimiser step. Every method does nothing by default. A trainer with no callback pays one
/// test of an empty list per step.
class StepCallback {
 public:
  virtual ~StepCallback() = default;
  /// Before the forward pass of the step (gradient mode on).
  virtual void on_step_begin(const StepInfo& /*info*/) {}
  /// After backward and gradient clipping, before the optimiser changes any parameter.
  virtual void on_gradients(const StepInfo& /*info*/) {}
  /// After the optimiser step.
  virtual void on_step_end(const StepInfo& /*info*/) {}
};

/// The factor torch::nn::utils::clip_grad_norm_ multiplies every gradient by for a total norm `norm` and a limit
/// `max_norm` (<= 0 or infinite = no clipping): min(1, max_norm / (norm + 1e-6)), computed in fp32 as LibTorch
/// computes it for fp32 gradients.
inline double clip_coefficient(double max_norm, double norm) {
  if (!(max_norm > 0) || max_norm == std::numeric_limits<double>::infinity()) return 1.0;
  const float coef = static_cast<float>(max_norm) / (static_cast<float>(norm) + 1e-6f);
  return std::min(1.0, static_cast<double>(coef));
}

/// A trainer's step callbacks and the StepInfo of the step in progress: the trainer calls begin() before the
/// forward, gradients() after clipping, end() after the optimiser step. With no callback each call is one test.
class StepCallbacks {
 public:
  /// Adds `callback`; `who` names the trainer in the error for a null one.
  void add(std::shared_ptr<StepCallback> callback, std::string_view who) {
    if (!callback) detail::fail("{}::add_callback: null callback", who);
    list_.push_back(std::move(callback));
  }
  /// Removes `callback` (nothing when it is not there).
  void remove(const std::shared_ptr<StepCallback>& callback) { std::erase(list_, callback); }
  bool empty() const { return list_.empty(); }

  /// Builds the step's StepInfo with `make_info()` (only when there are callbacks) and calls on_step_begin.
  template <class MakeInfo>
  void begin(MakeInfo&& make_info) {
    if (list_.empty()) return;
    info_ = std::forward<MakeInfo>(make_info)();
    for (auto& callback : list_) callback->on_step_begin(info_);
  }
  /// Records the gradient norm before clipping and the clip factor for `max_norm`, and calls on_gradients.
  void gradients(double grad_norm, double max_norm) {
    if (list_.empty()) return;
    info_.grad_norm = grad_norm;
    info_.clip_coef = clip_coefficient(max_norm, grad_norm);
    for (auto& callback : list_) callback->on_gradients(info_);
  }
  /// Calls on_step_end and releases the step's tensors.
  void end() {
    if (list_.empty()) return;
    for (auto& callback : list_) callback->on_step_end(info_);
    info_ = StepInfo{};
  }

 private:
  std::vector<std::shared_ptr<StepCallback>> list_;
  StepInfo info_;
};

}  // namespace rlhf
