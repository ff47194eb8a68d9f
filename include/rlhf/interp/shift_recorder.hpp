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
#include <rlhf/model/conv1d.hpp>
#include <rlhf/train/step_callback.hpp>

namespace rlhf {

// ---- the linear layers of a model ----

/// A linear layer of a GPT-2-style model: its module path, role and block index.
struct LinearUnit {
  std::string name;                     ///< module path, e.g. "transformer.h.2.mlp.c_fc"
  LinearRole role = LinearRole::mlp_in;  ///< which projection
  int64_t layer = 0;                    ///< block index
  std::shared_ptr<Conv1DImpl> module;   ///< the layer
};

/// The Conv1D layers of `model` whose path ends in attn.c_attn, attn.c_proj, mlp.c_fc or mlp.c_proj inside a block
/// "h.{i}", in registration order, restricted to the roles in `roles`.
inline std::vector<LinearUnit> find_linear_units(torch::nn::Module& model, Targets roles = Targets::All) {
  std::vector<LinearUnit> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    auto conv = std::dynamic_pointer_cast<Conv1DImpl>(item.value());
    if (!conv) continue;
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
    int64_t layer = -1;
    const auto at = name.rfind(".h.") != std::string::npos ? name.rfind(".h.") + 3
                    : name.rfind("h.", 0) == 0              ? 2
                                                            : std::string::npos;
    if (at != std::string::npos) std::from_chars(name.data() + at, name.data() + name.size(), layer);
    out.push_back({name, role, layer, conv});
  }
  return out;
}

// ---- options and results ----

/// What a ShiftRecorder records.
struct ShiftRecorderOptions {
  Targets units = Targets::MLP;  ///< projections recorded, e.g. Targets::MLP | Targets::Attention
  bool biases = false;           ///< also record the biases of those projections
  int64_t top_k = 0;             ///< shifts kept per step, e.g. 10000; 0 = top_fraction of the recorded elements
  double top_fraction = 0.0013;  ///< kept per step as a fraction of the recorded elements (0.13%, the seed's share)
  int64_t datum_chunk = 8;       ///< data whose shares are computed at once (memory: chunk x in x out per unit)
  bool keep_dense = false;       ///< keep the last step's full shares (last_dense()): for tests and inspection
};

/// The full accounting of one recorded tensor for one step (ShiftRecorderOptions::keep_dense):
/// sum_b data[b] + momentum + decay == applied, to float rounding.
struct DenseShares {
  std::string name;        ///< e.g. "transformer.h.0.mlp.c_fc.weight"
  torch::Tensor data;      ///< [B, ...shape]: each datum's share of the step's update
  torch::Tensor momentum;  ///< [...shape]: share carried from earlier steps by the optimiser's momentum (0 for SGD)
  torch::Tensor decay;     ///< [...shape]: decoupled weight decay's share
  torch::Tensor applied;   ///< [...shape]: the update the optimiser applied (parameter after - before)
};

/// Cost of recording so far.
struct ShiftRecorderStats {
  int64_t steps = 0;            ///< steps recorded
  int64_t entries = 0;          ///< shifts kept
  double seconds = 0;           ///< time spent in the recorder's callbacks (computing shares, top-k, hand-over)
  int64_t recorded_elements = 0;  ///< elements of the recorded tensors (weights, and biases when asked)
};

// ---- the recorder ----

/// Records, for every step of a trainer it is attached to, each datum's share of the update applied to the weights
/// (and optionally biases) of the chosen linear layers of `model`, keeps the top-k shares by magnitude and hands
/// them, with the step's data, to a ShiftStore (optional: without one, only last() keeps them).
///
/// Per-datum gradients come from the step's single backward pass (LinearGradCapture): datum b is row b of the
/// batch, and its gradient g_b is the gradient of the terms of the trainer's loss that row b produces, so that
/// sum_b g_b is the batch gradient whatever the loss normalisation (LMTrainer's loss, a sum over target tokens
/// divided by their count, gives g_b = (1/N) sum_{t in targets of b} grad nll_t). Shares of the update (with c the
/// clipping factor and lr the parameter group's learning rate at the step):
/// - torch::optim::SGD without momentum: datum b: -lr c g_b; decay: -lr wd p (weight_decay wd).
/// - torch::optim::AdamW (as GroupedAdamW): with t the step count, m the new first moment, v-hat = v / (1 - b2^t)
///   and D = sqrt(v-hat) + eps as the step computed them: datum b: -lr (1 - b1) c g_b / ((1 - b1^t) D);
///   momentum: -lr m / ((1 - b1^t) D) - sum_b share_b, i.e. earlier steps' gradients (b1 times the old moment)
///   plus rounding; decay: -lr wd p_old.
/// Attach to one trainer at a time; the model's layers get the recorder's capture hooks until it is destroyed.
class ShiftRecorder : public StepCallback {
 public:
  /// Records the layers of `model` (a GPT-2-style module) that `options.units` selects and that train. `store`
  /// may be null (nothing written).
  ShiftRecorder(torch::nn::Module& model, ShiftRecorderOptions options = {},
                std::shared_ptr<ShiftStore> store = nullptr)
      : options_(std::move(options)), store_(std::move(store)) {
    if (options_.top_k < 0) detail::fail("ShiftRecorderOptions: top_k must be >= 0, got {}", options_.top_k);
    if (options_.top_k == 0 && !(options_.top_fraction > 0 && options_.top_fraction <= 1))
      detail::fail("ShiftRecorderOptions: top_fraction must be in (0, 1] when top_k = 0, got {}",
                   options_.top_fraction);
    if (options_.datum_chunk < 1)
      detail::fail("ShiftRecorderOptions: datum_chunk must be >= 1, got {}", options_.datum_chunk);
    for (auto& unit : find_linear_units(model, options_.units)) {
      if (!unit.module->weight.requires_grad()) continue;
      Recorded r;
      r.capture = std::make_unique<LinearGradCapture>(unit.module, unit.name);
      r.unit = std::move(unit);
      const auto& w = r.unit.module->weight;
      const std::string role(role_name(r.unit.role));
      r.weight_id = store_ ? store_->add_unit(r.unit.name + ".weight", role, "weight", r.unit.layer, w.size(0),
                                              w.size(1))
                           : static_cast<int32_t>(2 * units_.size());
      stats_.recorded_elements += w.numel();
      if (options_.biases && r.unit.module->bias.requires_grad()) {
        r.bias_id = store_ ? store_->add_unit(r.unit.name + ".bias", role, "bias", r.unit.layer, 1,
                                              r.unit.module->bias.size(0))
                           : static_cast<int32_t>(2 * units_.size() + 1);
        stats_.recorded_elements += r.unit.module->bias.numel();
      }
      units_.push_back(std::move(r));
    }
    if (units_.empty())
      detail::fail("ShiftRecorder: the model has no trainable Conv1D layer among the selected units ---> HINT: "
                   "select units with ShiftRecorderOptions::units; LoRA layers are not recorded yet (their base "
                   "weights are frozen)");
  }

  /// Sets the epoch written with the following steps.
  void set_epoch(int64_t epoch) { epoch_ = epoch; }
  /// Turns recording on or off between steps (off: the callbacks return at once and the layers capture nothing).
  void set_enabled(bool enabled) { enabled_ = enabled; }

  // ---- the StepCallback protocol (also callable by a hand-written training loop) ----

  /// Arms the captures: the step's forwards under gradient mode are kept.
  void on_step_begin(const StepInfo& /*info*/) override {
    if (!enabled_) return;
    for (auto& r : units_) r.capture->arm();
    in_step_ = true;
  }

  /// Disarms the captures and keeps the parameters as they are before the update.
  void on_gradients(const StepInfo& info) override {
    if (!in_step_) return;
    const auto start = std::chrono::steady_clock::now();
    for (auto& r : units_) {
      r.capture->disarm();
      r.weight_before = r.unit.module->weight.detach().clone();
      if (r.bias_id >= 0) r.bias_before = r.unit.module->bias.detach().clone();
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
    for (auto& r : units_) {
      const int64_t rows = r.capture->batch_size();
      if (rows == 0 || r.capture->complete_forwards() == 0) continue;  // not in this step's loss
      if (rows != batch)
        detail::fail("ShiftRecorder: layer '{}' saw {} rows but the step's ids have {}", r.unit.name, rows, batch);
      for (int kind = 0; kind < 2; ++kind) {
        if (kind == 1 && r.bias_id < 0) continue;
        auto& param = kind == 0 ? r.unit.module->weight : r.unit.module->bias;
        const auto& before = kind == 0 ? r.weight_before : r.bias_before;
        auto coef = share_coefficients(*info.optimizer, param, before);
        if (first) step.lr = coef.lr, first = false;
        auto applied = param.detach() - before;
        update_sq += applied.to(torch::kDouble).pow(2).sum().item<double>();
        torch::Tensor data_sum;
        std::vector<torch::Tensor> dense_chunks;
        for (int64_t begin = 0; begin < batch; begin += options_.datum_chunk) {
          const int64_t n = std::min(options_.datum_chunk, batch - begin);
          auto grads = kind == 0 ? r.capture->weight_grads(begin, n) : r.capture->bias_grads(begin, n);
          auto shares = grads.mul_(coef.scale);  // [n, ...shape]
          data_sum = data_sum.defined() ? data_sum.add_(shares.sum(0)) : shares.sum(0);
          top.add(shares.reshape({n, -1}), begin, kind == 0 ? r.weight_id : r.bias_id, k);
          if (options_.keep_dense) dense_chunks.push_back(shares);
        }
        data_sq += data_sum.to(torch::kDouble).pow(2).sum().item<double>();
        if (coef.moment_step.defined()) coef.momentum = coef.moment_step - data_sum;
        residual_sq += (coef.momentum + coef.decay).to(torch::kDouble).pow(2).sum().item<double>();
        if (options_.keep_dense)
          dense_.push_back({r.unit.name + (kind == 0 ? ".weight" : ".bias"), torch::cat(dense_chunks),
                            coef.momentum, coef.decay, applied});
      }
      r.capture->clear();
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
    for (const auto& r : units_) {
      if (name == r.unit.name + ".weight") return r.weight_id;
      if (name == r.unit.name + ".bias") return r.bias_id;
    }
    return -1;
  }
  /// The recorded layers.
  std::vector<LinearUnit> units() const {
    std::vector<LinearUnit> out;
    for (const auto& r : units_) out.push_back(r.unit);
    return out;
  }

 private:
  struct Recorded {
    LinearUnit unit;
    std::unique_ptr<LinearGradCapture> capture;
    int32_t weight_id = -1, bias_id = -1;
    torch::Tensor weight_before, bias_before;
  };

  /// How a raw per-datum gradient maps to its share of the update, and the residual shares.
  struct Coefficients {
    torch::Tensor scale;     // broadcastable to the parameter: share_b = scale * g_b (g_b unclipped)
    torch::Tensor momentum;  // [...shape]
    torch::Tensor decay;     // [...shape]
    // AdamW: the whole first-moment step -lr m' / ((1 - b1^t) D); the momentum share is what the data's shares
    // leave of it (b1 m, plus the rounding difference between autograd's gradient and the per-sample sum).
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
          picked = picked.index_select(0, std::get<1>(magnitude.index_select(0, picked).topk(kk)));
      } else {
        picked = std::get<1>(magnitude.topk(kk));
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

  /// Share coefficients of `param` after the optimiser's step, from its state and `before` (the parameter
  /// before the step).
  Coefficients share_coefficients(torch::optim::Optimizer& optimizer, const torch::Tensor& param,
                                  const torch::Tensor& before) const {
    Coefficients c;
    auto& options = group_options(optimizer, param);
    if (auto* adamw = dynamic_cast<torch::optim::AdamWOptions*>(&options)) {
      if (adamw->amsgrad()) detail::fail("ShiftRecorder: AdamW with amsgrad is not supported");
      auto* state = dynamic_cast<torch::optim::AdamWParamState*>(param_state(optimizer, param));
      if (!state) detail::fail("ShiftRecorder: AdamW has no state for a recorded parameter after its step");
      const double lr = adamw->lr(), wd = adamw->weight_decay(), eps = adamw->eps();
      const double b1 = std::get<0>(adamw->betas()), b2 = std::get<1>(adamw->betas());
      const auto t = static_cast<double>(state->step());
      const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
      auto denom = (state->exp_avg_sq().sqrt() / std::sqrt(bc2)).add_(eps);  // as AdamW computes it
      auto step_over_denom = denom.reciprocal().mul_(lr / bc1);             // lr / (bc1 D)
      c.scale = step_over_denom * (-(1 - b1) * clip_coef_);
      c.moment_step = -state->exp_avg() * step_over_denom;
      c.decay = before * (-lr * wd);
      c.lr = lr;
      return c;
    }
    if (auto* sgd = dynamic_cast<torch::optim::SGDOptions*>(&options)) {
      if (sgd->momentum() != 0)
        detail::fail("ShiftRecorder: SGD with momentum is not supported yet (momentum = {})", sgd->momentum());
      const double lr = sgd->lr(), wd = sgd->weight_decay();
      c.scale = torch::scalar_tensor(-lr * clip_coef_, param.options().requires_grad(false));
      c.momentum = torch::zeros_like(before);
      c.decay = before * (-lr * wd);
      c.lr = lr;
      return c;
    }
    detail::fail("ShiftRecorder: unsupported optimiser (supported: torch::optim::AdamW as in GroupedAdamW, "
                 "torch::optim::SGD without momentum)");
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
  std::vector<Recorded> units_;
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
