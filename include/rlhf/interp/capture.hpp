#pragma once
/// @file Per-sample gradients of linear layers from the one backward pass of a training step: a capture attached to
/// a Conv1D (through its LinearCapture hook point) keeps the layer's input x [B, T, in] and receives the gradient of
/// its output dL/dy [B, T, out]; datum b's weight gradient is then sum_t x[b, t]^T dL/dy[b, t] (Goodfellow 2015,
/// "Efficient per-example gradient computations", arXiv 1510.01799), its bias gradient sum_t dL/dy[b, t].

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/model/conv1d.hpp>

namespace rlhf {

// ---- per-sample gradients ----

/// Per-datum weight gradients of a linear layer y = x W + b (W stored [in, out]) from its input `x` [B, T, in] and
/// output gradient `dy` [B, T, out]: [B, in, out] with out[b] = sum_t x[b, t]^T dy[b, t]. Summed over b this is
/// the batch gradient of W. Computed in `dtype` (the weight's), whatever the activations' dtype (bf16 under
/// autocast).
inline torch::Tensor per_sample_weight_grad(const torch::Tensor& x, const torch::Tensor& dy,
                                            torch::ScalarType dtype) {
  return torch::bmm(x.to(dtype).transpose(1, 2), dy.to(dtype));  // [B, in, T] x [B, T, out] -> [B, in, out]
}

/// Per-datum bias gradients [B, out] = sum_t dy[b, t] from `dy` [B, T, out].
inline torch::Tensor per_sample_bias_grad(const torch::Tensor& dy, torch::ScalarType dtype) {
  return dy.to(dtype).sum(1);
}

// ---- the capture of one layer ----

/// Captures the forwards of one Conv1D while armed and under gradient mode: each forward's input (detached) and,
/// through a hook on its output, the output gradient. A step may run several forwards through the layer (each is
/// kept); per_sample_weight_grad() sums their per-datum gradients, which requires every forward to have the same
/// batch rows. Install with attach(); the layer's hook point is cleared by detach() and by the destructor.
class LinearGradCapture : public LinearCapture {
 public:
  /// Captures `layer`; `name` identifies it in messages (e.g. "transformer.h.0.mlp.c_fc").
  LinearGradCapture(std::shared_ptr<Conv1DImpl> layer, std::string name)
      : layer_(std::move(layer)), name_(std::move(name)), records_(std::make_shared<Records>()) {
    if (!layer_) detail::fail("LinearGradCapture: null layer for '{}'", name_);
    if (layer_->capture && layer_->capture != this)
      detail::fail("LinearGradCapture: layer '{}' already has a capture attached (one recorder per model)", name_);
    layer_->capture = this;
  }
  ~LinearGradCapture() override { detach(); }
  LinearGradCapture(const LinearGradCapture&) = delete;
  LinearGradCapture& operator=(const LinearGradCapture&) = delete;

  /// Clears the layer's hook point (the layer computes as if never captured).
  void detach() {
    if (layer_ && layer_->capture == this) layer_->capture = nullptr;
  }

  /// Starts keeping forwards (drops what an earlier step kept).
  void arm() {
    clear();
    armed_ = true;
  }
  /// Stops keeping forwards; what was kept stays until clear() or the next arm().
  void disarm() { armed_ = false; }
  /// Drops what was kept.
  void clear() { records_->clear(); }

  void on_forward(const torch::Tensor& x, const torch::Tensor& y) override {
    if (!armed_ || !torch::GradMode::is_enabled() || !y.requires_grad()) return;
    const int64_t in = x.size(-1), b = x.dim() >= 2 ? x.size(0) : 1;
    records_->push_back({x.detach().reshape({b, -1, in}), torch::Tensor()});
    const size_t slot = records_->size() - 1;
    // The hook holds the records by shared pointer, so a graph that outlives the capture writes nowhere harmful.
    std::weak_ptr<Records> weak = records_;
    y.register_hook([weak, slot, b](const torch::Tensor& grad) {
      if (auto records = weak.lock(); records && slot < records->size()) {
        auto g = grad.detach().reshape({b, -1, grad.size(-1)});  // [B, T, out]
        auto& stored = (*records)[slot].dy;
        stored = stored.defined() ? stored + g : g;
      }
    });
  }

  /// Forwards kept since arm() whose output gradient has arrived.
  int64_t complete_forwards() const {
    int64_t n = 0;
    for (const auto& r : *records_) n += r.dy.defined() ? 1 : 0;
    return n;
  }

  /// Rows of the batch the kept forwards ran on (0 when none was kept).
  int64_t batch_size() const { return records_->empty() ? 0 : records_->front().x.size(0); }

  /// Per-datum gradients of the weight, [B, in, out] in the weight's dtype, for data `begin` .. `begin + count - 1`
  /// (count < 0: to the end). Forwards whose gradient never arrived (not part of the loss) add nothing.
  torch::Tensor weight_grads(int64_t begin = 0, int64_t count = -1) const {
    torch::Tensor sum;
    for (const auto& r : *records_) {
      if (!r.dy.defined()) continue;
      check_rows(r);
      const int64_t n = count < 0 ? r.x.size(0) - begin : count;
      auto g = per_sample_weight_grad(r.x.narrow(0, begin, n), r.dy.narrow(0, begin, n),
                                      layer_->weight.scalar_type());
      sum = sum.defined() ? sum.add_(g) : g;
    }
    return sum.defined() ? sum : torch::zeros({0, layer_->in_features(), layer_->out_features()},
                                              layer_->weight.options());
  }

  /// Per-datum gradients of the bias, [B, out] (or a range, as weight_grads()).
  torch::Tensor bias_grads(int64_t begin = 0, int64_t count = -1) const {
    torch::Tensor sum;
    for (const auto& r : *records_) {
      if (!r.dy.defined()) continue;
      check_rows(r);
      const int64_t n = count < 0 ? r.dy.size(0) - begin : count;
      auto g = per_sample_bias_grad(r.dy.narrow(0, begin, n), layer_->bias.scalar_type());
      sum = sum.defined() ? sum.add_(g) : g;
    }
    return sum.defined() ? sum : torch::zeros({0, layer_->out_features()}, layer_->bias.options());
  }

  const std::string& name() const { return name_; }
  Conv1DImpl& layer() const { return *layer_; }

 private:
  struct Record {
    torch::Tensor x;   // [B, T, in]
    torch::Tensor dy;  // [B, T, out], undefined until the backward pass reaches the layer
  };
  using Records = std::vector<Record>;

  void check_rows(const Record& r) const {
    if (r.x.size(0) != records_->front().x.size(0))
      detail::fail("LinearGradCapture: layer '{}' ran forwards on {} and {} rows in one step; per-datum gradients "
                   "need every forward of a step on the same batch rows",
                   name_, records_->front().x.size(0), r.x.size(0));
  }

  std::shared_ptr<Conv1DImpl> layer_;
  std::string name_;
  std::shared_ptr<Records> records_;
  bool armed_ = false;
};

// ---- capturing activations ----

/// Keeps the inputs of one Conv1D for every forward (any grad mode) while alive: on an MLP's output projection
/// (mlp.c_proj) these are the neurons' activations [B, T, d_mlp]. Detaches on destruction.
class LinearInputCapture : public LinearCapture {
 public:
  explicit LinearInputCapture(std::shared_ptr<Conv1DImpl> layer) : layer_(std::move(layer)) {
    if (!layer_) detail::fail("LinearInputCapture: null layer");
    if (layer_->capture) detail::fail("LinearInputCapture: the layer already has a capture attached");
    layer_->capture = this;
  }
  ~LinearInputCapture() override {
    if (layer_->capture == this) layer_->capture = nullptr;
  }
  LinearInputCapture(const LinearInputCapture&) = delete;
  LinearInputCapture& operator=(const LinearInputCapture&) = delete;

  void on_forward(const torch::Tensor& x, const torch::Tensor& /*y*/) override { inputs.push_back(x.detach()); }

  std::vector<torch::Tensor> inputs;  ///< one [..., in] per forward, in order

 private:
  std::shared_ptr<Conv1DImpl> layer_;
};

}  // namespace rlhf
