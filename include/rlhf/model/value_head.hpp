#pragma once
/// @file Value heads: read the final-layernorm residual [B, T, D] and estimate a value per position [B, T].

#include <cmath>
#include <concepts>
#include <cstdint>

#include <torch/torch.h>

#include <rlhf/core/gemm.hpp>

namespace rlhf {

/// A value head: a LibTorch module holder built from the model width (`Head(d_model)`) whose `forward` maps the
/// final-layernorm output [B, T, D] to values [B, T].
template <class H>
concept ValueHead = std::constructible_from<H, int64_t> && requires(H head, const torch::Tensor& hidden) {
  { head->forward(hidden) } -> std::convertible_to<torch::Tensor>;
  { head->parameters() } -> std::convertible_to<std::vector<torch::Tensor>>;
};

/// The seed notebook's value head: d_model -> 4 d_model -> 1 with a ReLU, reading the residual stream right after
/// the final layernorm. The last layer starts small (N(0, 1e-3^2) weights, zero bias) so early values are ~0 and do
/// not swamp the advantages before the head has learned anything.
class MLPValueHeadImpl : public torch::nn::Module {
 public:
  explicit MLPValueHeadImpl(int64_t d_model) : d_model_(d_model) {
    hidden = register_module("hidden", torch::nn::Linear(d_model, 4 * d_model));
    out = register_module("out", torch::nn::Linear(4 * d_model, 1));
    reset();
  }

  /// Re-initialises: the first layer as torch::nn::Linear does, the last layer small.
  void reset() {
    torch::NoGradGuard no_grad;
    hidden->reset_parameters();
    out->weight.normal_(0.0, 1e-3);
    out->bias.zero_();
  }

  /// hidden_states: [B, T, D] -> values [B, T] (fp32). The wide layer is the library's product (linear_addmm on
  /// the transposed weight, read in place): the same bf16 rounding as torch's linear under autocast, at the speed of
  /// the GPT-2 layers' products (torch's bf16 linear ran at ~0.5 TFLOP/s here, and cast the weight every call).
  torch::Tensor forward(const torch::Tensor& hidden_states) {
    auto x = hidden_states.to(hidden->weight.scalar_type());
    auto rows = x.reshape({-1, x.size(-1)});
    auto wide = torch::relu(linear_addmm(hidden->bias, rows, hidden->weight.t()));  // [N, 4D]
    auto lead = x.sizes().vec();
    lead.back() = 1;
    return out(wide).view(lead).squeeze(-1).to(torch::kFloat);
  }

  int64_t d_model() const { return d_model_; }

  torch::nn::Linear hidden{nullptr};  ///< [D] -> [4D]
  torch::nn::Linear out{nullptr};     ///< [4D] -> [1]

 private:
  int64_t d_model_;
};
TORCH_MODULE(MLPValueHead);

/// A single linear map d_model -> 1, zero-initialised (values start at exactly 0).
class LinearValueHeadImpl : public torch::nn::Module {
 public:
  explicit LinearValueHeadImpl(int64_t d_model) {
    out = register_module("out", torch::nn::Linear(d_model, 1));
    reset();
  }

  /// Zero weights and bias.
  void reset() {
    torch::NoGradGuard no_grad;
    out->weight.zero_();
    out->bias.zero_();
  }

  /// hidden_states: [B, T, D] -> values [B, T] (fp32)
  torch::Tensor forward(const torch::Tensor& hidden_states) {
    return out(hidden_states.to(out->weight.scalar_type())).squeeze(-1).to(torch::kFloat);
  }

  torch::nn::Linear out{nullptr};  ///< [D] -> [1]
};
TORCH_MODULE(LinearValueHead);

}  // namespace rlhf
