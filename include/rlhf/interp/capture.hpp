#pragma once
/// @file Per-sample gradients from the one backward pass of a training step. A capture attached to a layer's capture
/// point (rlhf/model/capture_point.hpp) keeps the layer's input x [B, T, in] and receives the gradient of its output
/// dL/dy [B, T, out]; datum b's gradients then follow from row b alone (Goodfellow 2015, "Efficient per-example
/// gradient computations", arXiv 1510.01799): a linear layer's weight sum_t x[b, t]^T dL/dy[b, t], its bias
/// sum_t dL/dy[b, t], a LoRA adapter's factors, a layernorm's gain and bias, and embedding rows.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/model/capture_point.hpp>
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

/// Per-datum gradients of a LoRA adapter's factors, y += s x A^T B^T with A [r, in] and B [out, r], from the
/// adapter's input `x` [B, T, in] (after its dropout) and the output gradient `dy` [B, T, out]:
/// dA[b] = s sum_t (dy B)[b, t]^T x[b, t] ([B, r, in]) and dB[b] = s sum_t dy[b, t]^T (x A^T)[b, t] ([B, out, r]).
/// `a` and `b` are the factors as the forward pass used them.
inline std::pair<torch::Tensor, torch::Tensor> per_sample_lora_grads(const torch::Tensor& x, const torch::Tensor& dy,
                                                                     const torch::Tensor& a, const torch::Tensor& b,
                                                                     double scale) {
  const auto dtype = a.scalar_type();
  auto xd = x.to(dtype), dyd = dy.to(dtype);
  auto grad_a = torch::bmm(torch::matmul(dyd, b).transpose(1, 2), xd).mul_(scale);      // [B, r, T] x [B, T, in]
  auto grad_b = torch::bmm(dyd.transpose(1, 2), torch::matmul(xd, a.t())).mul_(scale);  // [B, out, T] x [B, T, r]
  return {grad_a, grad_b};
}

/// Per-datum gradients of a layernorm's gain and bias, [B, D] each, from its input `x` [B, T, D] and output gradient
/// `dy` [B, T, D]: sum_t dy * x-hat and sum_t dy, with x-hat = (x - mean) / sqrt(var + eps) over the last dimension.
inline std::pair<torch::Tensor, torch::Tensor> per_sample_layer_norm_grads(const torch::Tensor& x,
                                                                           const torch::Tensor& dy, double eps,
                                                                           torch::ScalarType dtype) {
  auto xhat = torch::layer_norm(x.to(dtype), {x.size(-1)}, {}, {}, eps);
  auto dyd = dy.to(dtype);
  return {(dyd * xhat).sum(1), dyd.sum(1)};
}

/// Adds the per-datum gradients of an embedding table [rows, D] looked up at `ids` [B, T] with output gradient `dy`
/// [B, T, D] (already multiplied by any factor the lookup was scaled by) to `out` [B, rows, D] in place: row
/// ids[b, t] of datum b receives dy[b, t]. Returns `out`.
inline torch::Tensor& add_per_sample_embedding_grad_(torch::Tensor& out, const torch::Tensor& ids,
                                                     const torch::Tensor& dy) {
  const int64_t n = ids.size(0), rows = out.size(1), d = out.size(2);
  auto offset = torch::arange(n, ids.options().dtype(torch::kLong)).mul_(rows).unsqueeze(1);  // [B, 1]
  out.view({n * rows, d}).index_add_(0, (ids.to(torch::kLong) + offset).reshape({-1}),
                                     dy.to(out.scalar_type()).reshape({-1, d}));
  return out;
}

// ---- the capture of one layer ----

namespace detail {

/// What a capture keeps while armed and under gradient mode: one record per forward, whose `dy` a gradient hook on
/// the forward's output fills in the backward pass (summed when the output is used more than once). The hook holds
/// the records by weak pointer, so a graph that outlives the capture writes nowhere harmful.
template <class Record>
class CaptureLog {
 public:
  /// Starts keeping forwards (drops what an earlier step kept).
  void arm() {
    clear();
    armed_ = true;
  }
  /// Stops keeping forwards; what was kept stays until clear() or the next arm().
  void disarm() { armed_ = false; }
  /// Drops what was kept.
  void clear() { records_->clear(); }
  /// True when a forward with output `y` is to be kept.
  bool wants(const torch::Tensor& y) const { return armed_ && torch::GradMode::is_enabled() && y.requires_grad(); }
  /// Keeps `record` and hooks `y`: its gradient, passed through `shape`, becomes the record's dy.
  void keep(Record record, const torch::Tensor& y, std::function<torch::Tensor(const torch::Tensor&)> shape) {
    records_->push_back(std::move(record));
    const size_t slot = records_->size() - 1;
    std::weak_ptr<std::vector<Record>> weak = records_;
    y.register_hook([weak, slot, shape = std::move(shape)](const torch::Tensor& grad) {
      if (!grad.defined()) return;  // an output that gets no gradient (e.g. token_stats_chunked's probe row)
      if (auto records = weak.lock(); records && slot < records->size()) {
        auto g = shape(grad.detach());
        auto& stored = (*records)[slot].dy;
        stored = stored.defined() ? stored + g : g;
      }
    });
  }
  /// The forwards kept since arm(), in order.
  const std::vector<Record>& records() const { return *records_; }

 private:
  std::shared_ptr<std::vector<Record>> records_ = std::make_shared<std::vector<Record>>();
  bool armed_ = false;
};

}  // namespace detail

/// Captures the forwards of one layer through its capture point while armed and under gradient mode: each
/// forward's input (detached, as [B, T, in]: a 2-D input [N, in] is N rows of one position) and, through a hook on
/// its output, the output gradient. A step may run several forwards through the layer (each is kept, in order).
/// Install on construction; the capture point is cleared by detach() and by the destructor.
class GradCapture : public ForwardCapture {
 public:
  /// One forward: the input and its output gradient.
  struct Record {
    torch::Tensor x;         ///< [B, T, in]
    torch::Tensor dy;        ///< [B, T, out], undefined until the backward pass reaches the layer
    bool rows_only = false;  ///< the input was [N, in] (rows without a batch layout, kept as [N, 1, in])
  };

  /// Captures through `*slot`, a capture point of `owner` (kept alive); `name` identifies the layer in messages
  /// (e.g. "transformer.h.0.mlp.c_fc").
  GradCapture(std::shared_ptr<torch::nn::Module> owner, ForwardCapture** slot, std::string name)
      : owner_(std::move(owner)), slot_(slot), name_(std::move(name)) {
    if (!owner_ || !slot_) detail::fail("GradCapture: null layer for '{}'", name_);
    if (*slot_ && *slot_ != this)
      detail::fail("GradCapture: layer '{}' already has a capture attached (one recorder per model)", name_);
    *slot_ = this;
  }
  ~GradCapture() override { detach(); }
  GradCapture(const GradCapture&) = delete;
  GradCapture& operator=(const GradCapture&) = delete;

  /// Clears the layer's capture point (the layer computes as if never captured).
  void detach() {
    if (slot_ && *slot_ == this) *slot_ = nullptr;
  }

  /// Starts keeping forwards (drops what an earlier step kept).
  void arm() { log_.arm(); }
  /// Stops keeping forwards; what was kept stays until clear() or the next arm().
  void disarm() { log_.disarm(); }
  /// Drops what was kept.
  void clear() { log_.clear(); }

  void on_forward(const torch::Tensor& x, const torch::Tensor& y) override {
    if (!log_.wants(y)) return;
    const int64_t in = x.size(-1), b = x.dim() >= 2 ? x.size(0) : 1;
    log_.keep({x.detach().reshape({b, -1, in}), torch::Tensor(), x.dim() < 3}, y,
              [b](const torch::Tensor& g) { return g.reshape({b, -1, g.size(-1)}); });
  }

  /// Forwards kept since arm() whose output gradient has arrived.
  int64_t complete_forwards() const {
    int64_t n = 0;
    for (const auto& r : records()) n += r.dy.defined() ? 1 : 0;
    return n;
  }

  /// Rows of the batch the kept forwards ran on (0 when none was kept).
  int64_t batch_size() const { return records().empty() ? 0 : records().front().x.size(0); }

  /// The forwards kept since arm(), in order (those whose gradient never arrived have an undefined dy).
  const std::vector<Record>& records() const { return log_.records(); }

  /// sum over the complete forwards of `per_datum(x rows, dy rows)` for data `begin` .. `begin + count - 1`
  /// (count < 0: to the end); undefined when no forward is complete. Every forward must have the same batch rows.
  torch::Tensor sum_over_forwards(int64_t begin, int64_t count,
                                  const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>&
                                      per_datum) const {
    torch::Tensor sum;
    for (const auto& r : records()) {
      if (!r.dy.defined()) continue;
      if (r.x.size(0) != records().front().x.size(0))
        detail::fail("GradCapture: layer '{}' ran forwards on {} and {} rows in one step; per-datum gradients need "
                     "every forward of a step on the same batch rows",
                     name_, records().front().x.size(0), r.x.size(0));
      const int64_t n = count < 0 ? r.x.size(0) - begin : count;
      auto g = per_datum(r.x.narrow(0, begin, n), r.dy.narrow(0, begin, n));
      sum = sum.defined() ? sum.add_(g) : g;
    }
    return sum;
  }

  const std::string& name() const { return name_; }

 private:
  std::shared_ptr<torch::nn::Module> owner_;
  ForwardCapture** slot_;
  std::string name_;
  detail::CaptureLog<Record> log_;
};

/// The capture of one Conv1D, with its per-datum weight and bias gradients.
class LinearGradCapture : public GradCapture {
 public:
  /// Captures `layer`; `name` identifies it in messages (e.g. "transformer.h.0.mlp.c_fc").
  LinearGradCapture(std::shared_ptr<Conv1DImpl> layer, std::string name)
      : GradCapture(layer, layer ? &layer->capture : nullptr, std::move(name)), layer_(std::move(layer)) {}

  /// Per-datum gradients of the weight, [B, in, out] in the weight's dtype, for data `begin` .. `begin + count - 1`
  /// (count < 0: to the end). Forwards whose gradient never arrived (not part of the loss) add nothing.
  torch::Tensor weight_grads(int64_t begin = 0, int64_t count = -1) const {
    const auto dtype = layer_->weight.scalar_type();
    auto sum = sum_over_forwards(begin, count, [&](const torch::Tensor& x, const torch::Tensor& dy) {
      return per_sample_weight_grad(x, dy, dtype);
    });
    return sum.defined() ? sum : torch::zeros({0, layer_->in_features(), layer_->out_features()},
                                              layer_->weight.options());
  }

  /// Per-datum gradients of the bias, [B, out] (or a range, as weight_grads()).
  torch::Tensor bias_grads(int64_t begin = 0, int64_t count = -1) const {
    const auto dtype = layer_->bias.scalar_type();
    auto sum = sum_over_forwards(begin, count, [&](const torch::Tensor& /*x*/, const torch::Tensor& dy) {
      return per_sample_bias_grad(dy, dtype);
    });
    return sum.defined() ? sum : torch::zeros({0, layer_->out_features()}, layer_->bias.options());
  }

  Conv1DImpl& layer() const { return *layer_; }

 private:
  std::shared_ptr<Conv1DImpl> layer_;
};

/// Captures the embedding layer of a GPT-2 (GPT2TransformerImpl::embedding_capture) while armed and under
/// gradient mode: each forward's token and position ids, the token embeddings' scale and the gradient of the
/// embedding sum.
class EmbeddingGradCapture : public EmbeddingCapture {
 public:
  /// One forward.
  struct Record {
    torch::Tensor ids;           ///< [B, T]
    torch::Tensor position_ids;  ///< [B, T]
    double scale = 1;            ///< token embeddings' factor
    torch::Tensor dy;            ///< [B, T, D], undefined until the backward pass reaches the embeddings
  };

  /// Captures through `*slot`, the embedding capture point of `owner` (kept alive).
  EmbeddingGradCapture(std::shared_ptr<torch::nn::Module> owner, EmbeddingCapture** slot)
      : owner_(std::move(owner)), slot_(slot) {
    if (!owner_ || !slot_) detail::fail("EmbeddingGradCapture: null model");
    if (*slot_ && *slot_ != this)
      detail::fail("EmbeddingGradCapture: the embeddings already have a capture attached (one recorder per model)");
    *slot_ = this;
  }
  ~EmbeddingGradCapture() override {
    if (*slot_ == this) *slot_ = nullptr;
  }
  EmbeddingGradCapture(const EmbeddingGradCapture&) = delete;
  EmbeddingGradCapture& operator=(const EmbeddingGradCapture&) = delete;

  void arm() { log_.arm(); }
  void disarm() { log_.disarm(); }
  void clear() { log_.clear(); }

  void on_embed(const torch::Tensor& ids, const torch::Tensor& position_ids, double scale,
                const torch::Tensor& y) override {
    if (!log_.wants(y)) return;
    log_.keep({ids.detach(), position_ids.detach(), scale, torch::Tensor()}, y,
              [](const torch::Tensor& g) { return g; });
  }

  /// The forwards kept since arm(), in order.
  const std::vector<Record>& records() const { return log_.records(); }

 private:
  std::shared_ptr<torch::nn::Module> owner_;
  EmbeddingCapture** slot_;
  detail::CaptureLog<Record> log_;
};

// ---- capturing activations ----

/// Keeps the inputs of one Conv1D for every forward (any grad mode) while alive: on an MLP's output projection
/// (mlp.c_proj) these are the neurons' activations [B, T, d_mlp]. Detaches on destruction.
class LinearInputCapture : public ForwardCapture {
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
