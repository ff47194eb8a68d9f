#pragma once
/// @file Hugging Face's GPT-2 "Conv1D": a linear layer whose weight is stored [in, out].

#include <cstdint>

#include <torch/torch.h>

#include <rlhf/core/gemm.hpp>
#include <rlhf/model/capture_point.hpp>

namespace rlhf {

/// y = x W + b with W stored [in_features, out_features], the layout of GPT-2 checkpoints, so weights load unchanged.
class Conv1DImpl : public torch::nn::Module {
 public:
  /// `init_std` is the standard deviation of the normal initialisation of W (b starts at zero).
  Conv1DImpl(int64_t in_features, int64_t out_features, double init_std = 0.02)
      : in_features_(in_features), out_features_(out_features), init_std_(init_std) {
    weight = register_parameter("weight", torch::empty({in_features, out_features}));
    bias = register_parameter("bias", torch::empty({out_features}));
    reset();
  }

  /// Re-initialises W ~ N(0, init_std^2) and b = 0.
  void reset() {
    torch::NoGradGuard no_grad;
    weight.normal_(0.0, init_std_);
    bias.zero_();
  }

  /// x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x) {
    auto flat = x.reshape({-1, in_features_});  // [N, in]
    auto shape = x.sizes().vec();
    shape.back() = out_features_;
    auto y = linear_addmm(bias, flat, weight).view(shape);  // kernels of core/small_matmul.hpp and core/gemm.hpp
    if (capture) capture->on_forward(x, y);
    return y;
  }

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }

  torch::Tensor weight;  ///< [in, out]
  torch::Tensor bias;    ///< [out]
  /// Observer of this layer's forwards (not owned; null = none). Set and cleared by rlhf::ShiftRecorder.
  ForwardCapture* capture = nullptr;

 private:
  int64_t in_features_;
  int64_t out_features_;
  double init_std_;
};
TORCH_MODULE(Conv1D);

}  // namespace rlhf
