#pragma once
/// @file ShiftRecorder: per-datum parameter shifts of chosen linear layers, recorded while any trainer trains
/// (attach it as a StepCallback), from per-sample gradients of the step's one backward pass. Each step's shifts are
/// the data's exact shares of the update the optimiser applied (after gradient clipping); the top-k by magnitude go
/// to a ShiftStore. The accounting is defined in docs/transparency.md.

#include <algorithm>
#include <chrono>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>
#include <torch/version.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/interp/capture.hpp>
#include <rlhf/interp/shift_store.hpp>
#include <rlhf/model/capture_point.hpp>
#include <rlhf/model/conv1d.hpp>
#include <rlhf/train/step_callback.hpp>

namespace rlhf {

// ---- the linear layers of a model ----

/// A linear layer of a GPT-2-style model: its module path, role and block index.
struct LinearUnit {
  std::string name;                      ///< module path, e.g. "transformer.h.2.mlp.c_fc"
  LinearRole role = LinearRole::mlp_in;  ///< which projection
  int64_t layer = 0;                     ///< block index
  std::shared_ptr<Conv1DImpl> module;    ///< the layer, when it is a Conv1D (null for a LoRA layer)
  std::shared_ptr<LoRAConv1DImpl> lora;  ///< the layer, when it is a LoRAConv1D (null for a Conv1D)
};

namespace detail {

/// The block index i of a module path inside a block "h.{i}" ("transformer.h.3.mlp.c_fc" -> 3), or -1.
inline int64_t block_index(const std::string& name) {
  const auto at = name.rfind(".h.") != std::string::npos ? name.rfind(".h.") + 3
                  : name.rfind("h.", 0) == 0              ? 2
                                                          : std::string::npos;
  int64_t layer = -1;
  if (at != std::string::npos) std::from_chars(name.data() + at, name.data() + name.size(), layer);
  return layer;
}

/// Flat indices of the `k` largest entries of `magnitude` (1-D; in no particular order). A full top-k over tens of
/// millions of entries (a large vocabulary's embedding shares) costs hundreds of milliseconds, so for inputs much
/// larger than k a threshold read from an evenly strided sample of 65,536 entries (expected to let about 4k through)
/// first narrows the candidates. Exact: the threshold is used only when at least k entries exceed it, and then every
/// one of the k largest does; otherwise (ties, skewed samples) the full top-k runs.
inline torch::Tensor top_k_indices(const torch::Tensor& magnitude, int64_t k) {
  const int64_t n = magnitude.numel();
  constexpr int64_t kSample = int64_t{1} << 16;
  if (k > 0 && n >= 16 * kSample && n >= 64 * k) {
    auto sample = magnitude.slice(0, 0, n, n / kSample);  // [>= kSample]
    const int64_t above = std::min<int64_t>(sample.numel() - 1, (4 * k * sample.numel()) / n + 1);
    const double threshold = std::get<0>(sample.kthvalue(sample.numel() - above)).item<double>();
    auto candidates = magnitude.gt(threshold).nonzero().view({-1});
    if (candidates.numel() >= k) {
      if (candidates.numel() == k) return candidates;
      return candidates.index_select(0, std::get<1>(magnitude.index_select(0, candidates).topk(k)));
    }
  }
  return std::get<1>(magnitude.topk(std::min(k, n)));
}

}  // namespace detail

/// The linear layers (Conv1D or LoRAConv1D) of `model` whose path ends in attn.c_attn, attn.c_proj, mlp.c_fc or
/// mlp.c_proj inside a block "h.{i}", in registration order, restricted to the roles in `roles`.
inline std::vector<LinearUnit> find_linear_units(torch::nn::Module& model, Targets roles = Targets::All) {
  std::vector<LinearUnit> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    auto conv = std::dynamic_pointer_cast<Conv1DImpl>(item.value());
    auto lora = std::dynamic_pointer_cast<LoRAConv1DImpl>(item.value());
    if (!conv && !lora) continue;
    const std::string& name = item.key();
    auto ends_with = [&](std::string_view suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    LinearRole role;
    if (ends_with("attn.c_attn")) role = LinearRole::attn_qkv;
    else if (ends_with("attn.c_proj")) role = LinearRole::attn_out;
    else if (ends_with("mlp.c_fc")) role = LinearRole::mlp_in;
    else if (ends_with("mlp.c_proj")) role = LinearRole::mlp_out;
    else continue;
    if (!is_targeted(roles, role)) continue;
    out.push_back({name, role, detail::block_index(name), conv, lora});
  }
  return out;
}

// ---- options and results ----

/// What a ShiftRecorder records.
struct ShiftRecorderOptions {
  Targets units = Targets::MLP;  ///< projections recorded, e.g. Targets::MLP | Targets::Attention (their LoRA
                                 ///< adapters' factors in a LoRA model)
  bool biases = false;           ///< also record the biases of those projections
  bool layernorms = false;       ///< also record the gains and biases of the layernorms (ln_1, ln_2, ln_f)
  bool embeddings = false;       ///< also record the token embedding (its lookups and the tied output projection)
                                 ///< and learned position embeddings
  int64_t top_k = 0;             ///< shifts kept per step, e.g. 10000; 0 = top_fraction of the recorded elements
  double top_fraction = 0.0013;  ///< kept per step as a fraction of the recorded elements (0.13%, the seed's share)
  int64_t datum_chunk = 8;       ///< data whose shares are computed at once (memory: chunk x elements of a tensor,
                                 ///< fewer data for tensors over 2^25 elements)
  bool keep_dense = false;       ///< keep the last step's full shares (last_dense()): for tests and inspection
};

/// The full accounting of one recorded tensor for one step (ShiftRecorderOptions::keep_dense):
/// sum_b data[b] + momentum + decay == applied, to float rounding.
struct DenseShares {
  std::string name;        ///< e.g. "transformer.h.0.mlp.c_fc.weight"
  torch::Tensor data;      ///< [B, ...shape]: each datum's share of the step's update
  torch::Tensor momentum;  ///< [...shape]: share carried from earlier steps by the optimiser's momentum (0 without)
  torch::Tensor decay;     ///< [...shape]: weight decay's share
  torch::Tensor applied;   ///< [...shape]: the update the optimiser applied (parameter after - before)
};

/// Cost of recording so far.
struct ShiftRecorderStats {
  int64_t steps = 0;              ///< steps recorded
  int64_t entries = 0;            ///< shifts kept
  double seconds = 0;             ///< time spent in the recorder's callbacks (computing shares, top-k, hand-over)
  int64_t recorded_elements = 0;  ///< elements of the recorded tensors
};

// ---- the recorder ----

/// Records, for every step of a trainer it is attached to, each datum's share of the update applied to the chosen
/// tensors of `model` (the weights, optionally biases, of chosen linear layers or their LoRA factors; optionally the
/// layernorms and the embeddings), keeps the top-k shares by magnitude and hands them, with the step's data, to a
/// ShiftStore (optional: without one, only last() keeps them).
///
/// Per-datum gradients come from the step's single backward pass (rlhf/interp/capture.hpp): datum b is row b of
/// the batch, and its gradient g_b is the gradient of the terms of the trainer's loss that row b produces, so that
/// sum_b g_b is the batch gradient whatever the loss normalisation (LMTrainer's loss, a sum over target tokens
/// divided by their count, gives g_b = (1/N) sum_{t in targets of b} grad nll_t). Shares of the update (with c the
/// clipping factor and lr the parameter group's learning rate at the step):
/// - torch::optim::SGD (weight decay wd added to the gradient, momentum mu, dampening d, optionally Nesterov): with
///   a the factor of the step's own gradient in the update (1 without momentum; with momentum 1 at the parameter's
///   first step and 1 - d after; Nesterov: 1 + mu times that): datum b: -lr a c g_b; decay: -lr a wd p_old;
///   momentum: the rest of the step, -lr mu buf_old (Nesterov: -lr mu^2 buf_old), i.e. earlier steps' gradients
///   (0 without momentum).
/// - torch::optim::AdamW (as GroupedAdamW): with t the step count, m the new first moment, v-hat = v / (1 - b2^t)
///   and D = sqrt(v-hat) + eps as the step computed them: datum b: -lr (1 - b1) c g_b / ((1 - b1^t) D);
///   momentum: -lr m / ((1 - b1^t) D) - sum_b share_b, i.e. earlier steps' gradients (b1 times the old moment)
///   plus rounding; decay: -lr wd p_old.
/// Attach to one trainer at a time; the model's layers get the recorder's capture hooks until it is destroyed.
class ShiftRecorder : public StepCallback {
 public:
  /// Records the tensors of `model` (a GPT-2-style module) that `options` selects and that train. `store` may be
  /// null (nothing written).
  ShiftRecorder(torch::nn::Module& model, ShiftRecorderOptions options = {},
                std::shared_ptr<ShiftStore> store = nullptr)
      : options_(std::move(options)), store_(std::move(store)) {
    if (options_.top_k < 0) detail::fail("ShiftRecorderOptions: top_k must be >= 0, got {}", options_.top_k);
    if (options_.top_k == 0 && !(options_.top_fraction > 0 && options_.top_fraction <= 1))
      detail::fail("ShiftRecorderOptions: top_fraction must be in (0, 1] when top_k = 0, got {}",
                   options_.top_fraction);
    if (options_.datum_chunk < 1)
      detail::fail("ShiftRecorderOptions: datum_chunk must be >= 1, got {}", options_.datum_chunk);
    if (options_.embeddings) add_embeddings(model);
    for (auto& unit : find_linear_units(model, options_.units)) {
      if (unit.module && unit.module->weight.requires_grad()) {
        add(std::make_unique<LinearSource>(unit, options_.biases));
        linear_units_.push_back(std::move(unit));
      } else if (unit.lora && unit.lora->has_adapter() && unit.lora->lora_A.requires_grad() &&
                 unit.lora->lora_B.requires_grad()) {
        add(std::make_unique<LoRASource>(unit));
        linear_units_.push_back(std::move(unit));
      }
    }
    if (options_.layernorms)
      for (const auto& item : model.named_modules("", /*include_self=*/false))
        if (auto ln = std::dynamic_pointer_cast<GPT2LayerNormImpl>(item.value()))
          add(std::make_unique<LayerNormSource>(item.key(), ln));
    if (stats_.recorded_elements == 0)
      detail::fail("ShiftRecorder: the model has no trainable tensor among the selected ones ---> HINT: select "
                   "projections with ShiftRecorderOptions::units (in a LoRA model, targeted ones), or switch on "
                   "layernorms / embeddings");
  }

  /// Sets the epoch written with the following steps.
  void set_epoch(int64_t epoch) { epoch_ = epoch; }
  /// Turns recording on or off between steps (off: the callbacks return at once and the layers capture nothing).
  void set_enabled(bool enabled) { enabled_ = enabled; }

  // ---- the StepCallback protocol (also callable by a hand-written training loop) ----

  /// Arms the captures: the step's forwards under gradient mode are kept.
  void on_step_begin(const StepInfo& /*info*/) override {
    if (!enabled_) return;
    for (auto& source : sources_) source->arm();
    in_step_ = true;
  }

  /// Disarms the captures and keeps the parameters as they are before the update (and whether the optimiser had
  /// state for them).
  void on_gradients(const StepInfo& info) override {
    if (!in_step_) return;
    const auto start = std::chrono::steady_clock::now();
    for (auto& source : sources_) {
      source->disarm();
      for (auto& t : source->tensors) {
        t.before = t.param.detach().clone();
        t.had_state = info.optimizer && param_state(*info.optimizer, t.param) != nullptr;
      }
    }
    clip_coef_ = info.clip_coef;
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  /// Computes the data's shares of the update just applied, keeps the top-k and hands them to the store.
  void on_step_end(const StepInfo& info) override {
    if (!in_step_) return;
    in_step_ = false;
    const auto start = std::chrono::steady_clock::now();
    if (!info.optimizer) detail::fail("ShiftRecorder: StepInfo::optimizer is null (the optimiser is needed to "
                                      "account for the update)");
    if (!info.ids.defined() || info.ids.dim() != 2)
      detail::fail("ShiftRecorder: StepInfo::ids must be the step's [batch, seq] token ids");
    const int64_t batch = info.ids.size(0);
    StepShifts step;
    step.epoch = epoch_;
    step.step = info.step;
    step.clip_coef = clip_coef_;
    step.data = batch_tokens(info);
    dense_.clear();

    const int64_t k = options_.top_k > 0
                          ? options_.top_k
                          : std::max<int64_t>(1, std::llround(options_.top_fraction *
                                                              static_cast<double>(stats_.recorded_elements)));
    TopK top;
    double update_sq = 0, data_sq = 0, residual_sq = 0;
    bool first = true;
    for (auto& source : sources_) {
      const int64_t rows = source->rows();
      if (rows == 0) continue;  // not in this step's loss
      if (rows != batch)
        detail::fail("ShiftRecorder: '{}' saw {} rows but the step's ids have {}", source->tensors.front().name, rows,
                     batch);
      source->prepare(info);
      for (size_t i = 0; i < source->tensors.size(); ++i) {
        const auto& t = source->tensors[i];
        auto coef = share_coefficients(*info.optimizer, t);
        if (first) step.lr = coef.lr, first = false;
        auto applied = t.param.detach() - t.before;
        update_sq += applied.to(torch::kDouble).pow(2).sum().item<double>();
        torch::Tensor data_sum;
        std::vector<torch::Tensor> dense_chunks;
        const int64_t chunk =
            std::clamp<int64_t>(kChunkElements / std::max<int64_t>(1, t.param.numel()), 1, options_.datum_chunk);
        for (int64_t begin = 0; begin < batch; begin += chunk) {
          const int64_t n = std::min(chunk, batch - begin);
          auto shares = source->grads(i, begin, n).mul_(coef.scale);  // [n, ...shape]
          data_sum = data_sum.defined() ? data_sum.add_(shares.sum(0)) : shares.sum(0);
          top.add(shares.reshape({n, -1}), begin, t.id, k);
          if (options_.keep_dense) dense_chunks.push_back(shares);
        }
        data_sq += data_sum.to(torch::kDouble).pow(2).sum().item<double>();
        if (coef.moment_step.defined()) coef.momentum = coef.moment_step - data_sum;
        residual_sq += (coef.momentum + coef.decay).to(torch::kDouble).pow(2).sum().item<double>();
        if (options_.keep_dense)
          dense_.push_back({t.name, torch::cat(dense_chunks), coef.momentum, coef.decay, applied});
      }
      source->clear();
    }
    step.entries = top.entries();
    step.threshold = step.entries.empty() ? 0.0 : std::abs(step.entries.back().diff);
    step.update_norm = std::sqrt(update_sq);
    step.data_share_norm = std::sqrt(data_sq);
    step.residual_norm = std::sqrt(residual_sq);
    stats_.steps += 1;
    stats_.entries += static_cast<int64_t>(step.entries.size());
    last_ = step;
    if (store_) store_->push(std::move(step));
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stats_.seconds = seconds_;
  }

  // ---- results ----

  /// The last recorded step (entries largest |diff| first).
  const StepShifts& last() const { return last_; }
  /// The last step's full accounting per recorded tensor (empty unless keep_dense).
  const std::vector<DenseShares>& last_dense() const { return dense_; }
  /// Recording cost so far.
  ShiftRecorderStats stats() const { return stats_; }
  /// The store (may be null).
  const std::shared_ptr<ShiftStore>& store() const { return store_; }
  /// Unit id of the recorded tensor `name` (e.g. "transformer.h.0.mlp.c_fc.weight"); -1 when not recorded.
  int32_t unit_id(const std::string& name) const {
    for (const auto& source : sources_)
      for (const auto& t : source->tensors)
        if (t.name == name) return t.id;
    return -1;
  }
  /// Names of the recorded tensors, in unit-id order.
  std::vector<std::string> tensor_names() const {
    std::vector<std::string> out;
    for (const auto& source : sources_)
      for (const auto& t : source->tensors) out.push_back(t.name);
    return out;
  }
  /// The recorded linear layers.
  const std::vector<LinearUnit>& units() const { return linear_units_; }

 private:
  /// Shares of at most this many elements are computed at once (128 MiB in fp32).
  static constexpr int64_t kChunkElements = int64_t{1} << 25;

  /// One recorded tensor.
  struct Recorded {
    std::string name;     // e.g. "transformer.h.0.mlp.c_fc.weight"
    std::string role;     // e.g. "mlp_in", "layernorm", "embedding"
    std::string kind;     // "weight", "bias", "lora_A" or "lora_B"
    int64_t layer = -1;   // block index (-1 outside the blocks)
    torch::Tensor param;  // the parameter
    int32_t id = -1;      // unit id
    torch::Tensor before;   // the parameter before the step (as the step's forwards used it)
    bool had_state = false;  // the optimiser had state for it before the step
  };

  /// A capture and the tensors whose per-datum gradients it yields.
  class Source {
   public:
    virtual ~Source() = default;
    virtual void arm() = 0;
    virtual void disarm() = 0;
    virtual void clear() = 0;
    /// Data rows of this step's captured forwards whose gradient arrived; 0 when the source had no part in the
    /// step's loss.
    virtual int64_t rows() const = 0;
    /// Called once per step before grads().
    virtual void prepare(const StepInfo& /*info*/) {}
    /// Per-datum gradients [n, ...shape] of tensors[i] for data begin .. begin + n - 1.
    virtual torch::Tensor grads(size_t i, int64_t begin, int64_t n) = 0;
    std::vector<Recorded> tensors;
  };

  /// A capture holder: arming, clearing and the rows of a GradCapture.
  template <class Capture>
  class CapturedSource : public Source {
   public:
    void arm() override { capture->arm(); }
    void disarm() override { capture->disarm(); }
    void clear() override { capture->clear(); }
    int64_t rows() const override { return capture->complete_forwards() > 0 ? capture->batch_size() : 0; }
    std::unique_ptr<Capture> capture;
  };

  /// A Conv1D: weight [in, out] and bias [out].
  class LinearSource : public CapturedSource<LinearGradCapture> {
   public:
    LinearSource(const LinearUnit& unit, bool biases) {
      capture = std::make_unique<LinearGradCapture>(unit.module, unit.name);
      const std::string role(role_name(unit.role));
      tensors.push_back({unit.name + ".weight", role, "weight", unit.layer, unit.module->weight});
      if (biases && unit.module->bias.requires_grad())
        tensors.push_back({unit.name + ".bias", role, "bias", unit.layer, unit.module->bias});
    }
    torch::Tensor grads(size_t i, int64_t begin, int64_t n) override {
      return tensors[i].kind == "weight" ? capture->weight_grads(begin, n) : capture->bias_grads(begin, n);
    }
  };

  /// A LoRAConv1D's adapter: lora_A [r, in] and lora_B [out, r].
  class LoRASource : public CapturedSource<GradCapture> {
   public:
    explicit LoRASource(const LinearUnit& unit) : layer_(unit.lora) {
      capture = std::make_unique<GradCapture>(unit.lora, &unit.lora->capture, unit.name);
      const std::string role(role_name(unit.role));
      tensors.push_back({unit.name + ".lora_A", role, "lora_A", unit.layer, unit.lora->lora_A});
      tensors.push_back({unit.name + ".lora_B", role, "lora_B", unit.layer, unit.lora->lora_B});
    }
    torch::Tensor grads(size_t i, int64_t begin, int64_t n) override {
      return capture->sum_over_forwards(begin, n, [&](const torch::Tensor& x, const torch::Tensor& dy) {
        auto [grad_a, grad_b] =
            per_sample_lora_grads(x, dy, tensors[0].before, tensors[1].before, layer_->scale());
        return i == 0 ? grad_a : grad_b;
      });
    }

   private:
    std::shared_ptr<LoRAConv1DImpl> layer_;
  };

  /// A GPT2LayerNorm: gain [D] and bias [D].
  class LayerNormSource : public CapturedSource<GradCapture> {
   public:
    LayerNormSource(const std::string& name, const std::shared_ptr<GPT2LayerNormImpl>& ln) : ln_(ln) {
      capture = std::make_unique<GradCapture>(ln, &ln->capture, name);
      const int64_t layer = detail::block_index(name);
      for (auto [param, kind] : {std::pair{ln->weight, "weight"}, std::pair{ln->bias, "bias"}})
        if (param.requires_grad()) tensors.push_back({name + "." + kind, "layernorm", kind, layer, param});
    }
    torch::Tensor grads(size_t i, int64_t begin, int64_t n) override {
      const auto& t = tensors[i];
      return capture->sum_over_forwards(begin, n, [&](const torch::Tensor& x, const torch::Tensor& dy) {
        auto [gain, bias] = per_sample_layer_norm_grads(x, dy, ln_->options.eps(), t.param.scalar_type());
        return t.kind == "weight" ? gain : bias;
      });
    }

   private:
    std::shared_ptr<GPT2LayerNormImpl> ln_;
  };

  /// A GPT-2's token embedding wte [V, D] (looked up by the embedding layer and, tied, the output projection) and
  /// learned position embedding wpe [P, D].
  class EmbeddingSource : public Source {
   public:
    EmbeddingSource(const std::shared_ptr<torch::nn::Module>& transformer, GPT2CapturePoints& points,
                    const std::string& prefix)
        : embedding_(transformer, &points.embedding_capture),
          head_(transformer, &points.head_capture, prefix + "wte (output projection)") {
      for (const auto& child : transformer->named_children()) {
        auto table = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(child.value());
        if (!table || !table->weight.requires_grad()) continue;
        if (child.key() == "wte") {
          tensors.push_back({prefix + "wte.weight", "embedding", "weight", -1, table->weight});
          token_ = true;
        } else if (child.key() == "wpe") {
          tensors.push_back({prefix + "wpe.weight", "position_embedding", "weight", -1, table->weight});
        }
      }
    }
    void arm() override {
      embedding_.arm();
      if (token_) head_.arm();  // the output projection's inputs and logit gradients only when wte is recorded
    }
    void disarm() override {
      embedding_.disarm();
      head_.disarm();
    }
    void clear() override {
      embedding_.clear();
      head_.clear();
      head_rows_ = head_data_ = torch::Tensor();
      head_flat_ = false;
    }
    int64_t rows() const override {
      for (const auto& r : embedding_.records())
        if (r.dy.defined()) return r.ids.size(0);
      return 0;
    }

    /// Maps the output projection's rows to data: its forwards either ran on [B, T', D] (datum = leading index) or
    /// on flattened rows [N, D], which must be the positions predicting a target of StepInfo::loss_mask in
    /// row-major order (as LMTrainer passes them).
    void prepare(const StepInfo& info) override {
      std::vector<torch::Tensor> xs, dys;
      for (const auto& r : head_.records()) {
        if (!r.dy.defined()) continue;  // e.g. token_stats_chunked's probe row, which gets no gradient
        head_flat_ = head_flat_ || r.rows_only;
        xs.push_back(r.x.reshape({-1, r.x.size(-1)}));
        dys.push_back(r.dy.reshape({-1, r.dy.size(-1)}));
      }
      if (!head_flat_ || xs.empty()) return;
      head_rows_ = torch::cat(xs);
      head_dy_ = torch::cat(dys);
      if (!info.loss_mask.defined() || info.loss_mask.sizes() != info.ids.sizes())
        detail::fail("ShiftRecorder: the output projection ran on {} flattened rows [N, D]; mapping them to data "
                     "needs StepInfo::loss_mask [batch, seq] ---> HINT: pass the projection [batch, positions, D], "
                     "or set loss_mask so that the rows are the positions predicting a target, in row-major order",
                     head_rows_.size(0));
      const int64_t t = info.loss_mask.size(1);
      head_data_ = info.loss_mask.narrow(1, 1, t - 1).ne(0).nonzero().select(1, 0).to(head_rows_.device());  // [N]
      if (head_data_.size(0) != head_rows_.size(0))
        detail::fail("ShiftRecorder: the output projection ran on {} flattened rows but StepInfo::loss_mask marks {} "
                     "targets (the rows must be the positions predicting them, in row-major order)",
                     head_rows_.size(0), head_data_.size(0));
    }

    torch::Tensor grads(size_t i, int64_t begin, int64_t n) override {
      const auto& t = tensors[i];
      const auto dtype = t.param.scalar_type();
      const bool token = t.role == "embedding";
      // wte: the output projection's part first (written, not added, when it keeps the batch layout), then the
      // lookups' rows added in place; wpe: the lookups only.
      torch::Tensor sum;
      if (token && !head_flat_)
        sum = head_.sum_over_forwards(begin, n, [&](const torch::Tensor& x, const torch::Tensor& dy) {
          return per_sample_weight_grad(dy, x, dtype);  // [n, V, D] = sum_t dy^T h
        });
      if (!sum.defined())
        sum = torch::zeros({n, t.param.size(0), t.param.size(1)}, t.param.options().requires_grad(false));
      if (token && head_flat_) {  // rows of data begin .. begin + n - 1: dy^T h per datum
        for (int64_t j = 0; j < n; ++j) {
          auto picked = head_data_.eq(begin + j).nonzero().view({-1});
          if (picked.numel() == 0) continue;
          sum[j].addmm_(head_dy_.index_select(0, picked).to(dtype).t(), head_rows_.index_select(0, picked).to(dtype));
        }
      }
      for (const auto& r : embedding_.records()) {
        if (!r.dy.defined()) continue;
        auto dy = r.dy.narrow(0, begin, n);
        if (token) add_per_sample_embedding_grad_(sum, r.ids.narrow(0, begin, n), dy * r.scale);
        else add_per_sample_embedding_grad_(sum, r.position_ids.narrow(0, begin, n), dy);
      }
      return sum;
    }

   private:
    EmbeddingGradCapture embedding_;
    GradCapture head_;
    bool token_ = false;  // wte is recorded (it trains)
    bool head_flat_ = false;
    torch::Tensor head_rows_, head_dy_, head_data_;  // flattened head forwards: [N, D], [N, V], datum of each row
  };

  /// Registers `source`'s tensors with the store and takes it.
  void add(std::unique_ptr<Source> source) {
    for (auto& t : source->tensors) {
      const auto& p = t.param;
      const int64_t rows = p.dim() >= 2 ? p.size(0) : 1, cols = p.dim() >= 2 ? p.numel() / p.size(0) : p.numel();
      t.id = store_ ? store_->add_unit(t.name, t.role, t.kind, t.layer, rows, cols) : next_id_;
      ++next_id_;
      stats_.recorded_elements += p.numel();
    }
    if (!source->tensors.empty()) sources_.push_back(std::move(source));
  }

  /// Adds the embeddings of the GPT-2 transformer in `model`.
  void add_embeddings(torch::nn::Module& model) {
    for (const auto& item : model.named_modules("", /*include_self=*/true)) {
      auto* points = dynamic_cast<GPT2CapturePoints*>(item.value().get());
      if (!points) continue;
      add(std::make_unique<EmbeddingSource>(item.value(), *points, item.key().empty() ? "" : item.key() + "."));
      return;
    }
    detail::fail("ShiftRecorder: ShiftRecorderOptions::embeddings needs a GPT-2 model (no GPT2 transformer found)");
  }

  /// How a raw per-datum gradient maps to its share of the update, and the residual shares.
  struct Coefficients {
    torch::Tensor scale;     // broadcastable to the parameter: share_b = scale * g_b (g_b unclipped)
    torch::Tensor momentum;  // [...shape]
    torch::Tensor decay;     // [...shape]
    // The whole step but decay; the momentum share is what the data's shares leave of it (earlier steps'
    // gradients, plus the rounding difference between autograd's gradient and the per-sample sum).
    torch::Tensor moment_step;
    double lr = 0;
  };

  /// The running top-k of |share| over a step's chunks.
  class TopK {
   public:
    /// Adds the shares [n, numel] of data begin .. begin + n - 1 of unit `unit`.
    void add(const torch::Tensor& shares, int64_t begin, int32_t unit, int64_t k) {
      const int64_t per = shares.size(1);
      auto flat = shares.reshape({-1});
      const int64_t kk = std::min<int64_t>(k, flat.numel());
      if (kk == 0) return;
      auto magnitude = flat.abs();
      torch::Tensor picked;  // [<= kk] flat indices of the chunk's candidates
      if (values_.defined() && values_.size(0) == k) {
        // Once k candidates are held, only values above the smallest of them can enter: usually few, and a
        // comparison pass is much cheaper than a top-k over the whole chunk.
        const double threshold = values_.abs().min().item<double>();
        picked = magnitude.gt(threshold).nonzero().view({-1});
        if (picked.numel() == 0) return;
        if (picked.numel() > kk)
          picked = picked.index_select(0, detail::top_k_indices(magnitude.index_select(0, picked), kk));
      } else {
        picked = detail::top_k_indices(magnitude, kk);
      }
      const int64_t kept = picked.numel();
      auto values = flat.index_select(0, picked).to(torch::kDouble);     // [kept]
      auto rows = picked.div(per, "floor").add_(begin);                  // [kept]
      auto idx = picked.remainder(per);                                  // [kept]
      auto units = torch::full({kept}, static_cast<int64_t>(unit), torch::kLong);
      values_ = values_.defined() ? torch::cat({values_, values.cpu()}) : values.cpu();
      rows_ = rows_.defined() ? torch::cat({rows_, rows.cpu()}) : rows.cpu();
      idx_ = idx_.defined() ? torch::cat({idx_, idx.cpu()}) : idx.cpu();
      units_ = units_.defined() ? torch::cat({units_, units}) : units;
      if (values_.size(0) > k) {
        auto keep = std::get<1>(values_.abs().topk(k));
        values_ = values_.index_select(0, keep);
        rows_ = rows_.index_select(0, keep);
        idx_ = idx_.index_select(0, keep);
        units_ = units_.index_select(0, keep);
      }
    }

    /// The kept entries, largest |diff| first.
    std::vector<ShiftEntry> entries() const {
      std::vector<ShiftEntry> out;
      if (!values_.defined()) return out;
      auto order = std::get<1>(values_.abs().sort(0, /*descending=*/true));
      auto v = values_.index_select(0, order).contiguous();
      auto r = rows_.index_select(0, order).contiguous();
      auto i = idx_.index_select(0, order).contiguous();
      auto u = units_.index_select(0, order).contiguous();
      const auto* vp = v.data_ptr<double>();
      const auto* rp = r.data_ptr<int64_t>();
      const auto* ip = i.data_ptr<int64_t>();
      const auto* up = u.data_ptr<int64_t>();
      out.reserve(static_cast<size_t>(v.size(0)));
      for (int64_t n = 0; n < v.size(0); ++n)
        out.push_back({static_cast<int32_t>(rp[n]), static_cast<int32_t>(up[n]), ip[n], vp[n]});
      return out;
    }

   private:
    torch::Tensor values_, rows_, idx_, units_;
  };

  /// The optimiser's state of `param` (null when it has none yet).
  static torch::optim::OptimizerParamState* param_state(torch::optim::Optimizer& optimizer,
                                                        const torch::Tensor& param) {
#if TORCH_VERSION_MAJOR >= 2
    auto key = param.unsafeGetTensorImpl();
#else
    auto key = c10::guts::to_string(param.unsafeGetTensorImpl());
#endif
    auto it = optimizer.state().find(key);
    return it == optimizer.state().end() ? nullptr : it->second.get();
  }

  /// The options of the parameter group holding `param`.
  static torch::optim::OptimizerOptions& group_options(torch::optim::Optimizer& optimizer,
                                                       const torch::Tensor& param) {
    for (auto& group : optimizer.param_groups())
      for (const auto& p : group.params())
        if (p.is_same(param)) return group.options();
    detail::fail("ShiftRecorder: a recorded parameter is not optimised by the step's optimiser");
  }

  /// Share coefficients of recorded tensor `t` after the optimiser's step, from the optimiser's state and t.before
  /// (the parameter before the step).
  Coefficients share_coefficients(torch::optim::Optimizer& optimizer, const Recorded& t) const {
    Coefficients c;
    const auto& param = t.param;
    const auto& before = t.before;
    auto& options = group_options(optimizer, param);
    if (auto* adamw = dynamic_cast<torch::optim::AdamWOptions*>(&options)) {
      if (adamw->amsgrad()) detail::fail("ShiftRecorder: AdamW with amsgrad is not supported");
      auto* state = dynamic_cast<torch::optim::AdamWParamState*>(param_state(optimizer, param));
      if (!state) detail::fail("ShiftRecorder: AdamW has no state for '{}' after its step", t.name);
      const double lr = adamw->lr(), wd = adamw->weight_decay(), eps = adamw->eps();
      const double b1 = std::get<0>(adamw->betas()), b2 = std::get<1>(adamw->betas());
      const auto steps = static_cast<double>(state->step());
      const double bc1 = 1 - std::pow(b1, steps), bc2 = 1 - std::pow(b2, steps);
      auto denom = (state->exp_avg_sq().sqrt() / std::sqrt(bc2)).add_(eps);  // as AdamW computes it
      auto step_over_denom = denom.reciprocal().mul_(lr / bc1);             // lr / (bc1 D)
      c.scale = step_over_denom * (-(1 - b1) * clip_coef_);
      c.moment_step = -state->exp_avg() * step_over_denom;
      c.decay = before * (-lr * wd);
      c.lr = lr;
      return c;
    }
    if (auto* sgd = dynamic_cast<torch::optim::SGDOptions*>(&options)) {
      const double lr = sgd->lr(), wd = sgd->weight_decay(), mu = sgd->momentum();
      // The factor of this step's gradient (weight decay included) in the update, over -lr: 1 without momentum;
      // with it, the buffer takes the gradient whole at the first step and x (1 - dampening) after, and Nesterov
      // adds the gradient once more besides mu x buffer.
      double a = 1;
      if (mu != 0) {
        a = t.had_state ? 1 - sgd->dampening() : 1.0;
        if (sgd->nesterov()) a = 1 + mu * a;
      }
      c.scale = torch::scalar_tensor(-lr * a * clip_coef_, param.options().requires_grad(false));
      c.decay = before * (-lr * a * wd);
      c.lr = lr;
      if (mu == 0) {
        c.momentum = torch::zeros_like(before);
        return c;
      }
      auto* state = dynamic_cast<torch::optim::SGDParamState*>(param_state(optimizer, param));
      if (!state || !state->momentum_buffer().defined())
        detail::fail("ShiftRecorder: SGD has no momentum buffer for '{}' after its step", t.name);
      const auto& buffer = state->momentum_buffer();  // the new buffer, mu buf_old + a (g + wd p)
      if (sgd->nesterov()) {
        if (!param.grad().defined())
          detail::fail("ShiftRecorder: '{}' has no gradient after an SGD step with Nesterov momentum (the step is "
                       "reconstructed from it; zero the gradients before backward, not after the step)",
                       t.name);
        c.moment_step = -lr * (param.grad() + wd * before + mu * buffer) - c.decay;
      } else {
        c.moment_step = -lr * buffer - c.decay;
      }
      return c;
    }
    detail::fail("ShiftRecorder: unsupported optimiser for '{}' (supported: torch::optim::AdamW as in GroupedAdamW, "
                 "torch::optim::SGD)",
                 t.name);
  }

  /// Real tokens of each row of the step's batch.
  static std::vector<std::vector<int64_t>> batch_tokens(const StepInfo& info) {
    auto ids = info.ids.to(torch::kCPU, torch::kLong).contiguous();
    torch::Tensor mask = info.attention_mask.defined() ? info.attention_mask.to(torch::kCPU).ne(0).contiguous()
                                                       : torch::ones_like(ids, torch::kBool);
    std::vector<std::vector<int64_t>> out(static_cast<size_t>(ids.size(0)));
    const auto* ip = ids.data_ptr<int64_t>();
    const auto* mp = mask.data_ptr<bool>();
    const int64_t t = ids.size(1);
    for (int64_t b = 0; b < ids.size(0); ++b)
      for (int64_t j = 0; j < t; ++j)
        if (mp[b * t + j]) out[static_cast<size_t>(b)].push_back(ip[b * t + j]);
    return out;
  }

  ShiftRecorderOptions options_;
  std::shared_ptr<ShiftStore> store_;
  std::vector<std::unique_ptr<Source>> sources_;
  std::vector<LinearUnit> linear_units_;
  int32_t next_id_ = 0;
  int64_t epoch_ = 0;
  bool enabled_ = true;
  bool in_step_ = false;
  double clip_coef_ = 1;
  double seconds_ = 0;
  StepShifts last_;
  std::vector<DenseShares> dense_;
  ShiftRecorderStats stats_;
};

}  // namespace rlhf
