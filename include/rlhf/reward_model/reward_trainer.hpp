#pragma once
/// @file RewardTrainer: learns a reward model from human preferences (pairs of a chosen and a rejected sequence)
/// with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (Christiano et al. 2017, arXiv 1706.03741;
/// Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/adapters/freeze.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/data/collate.hpp>
#include <rlhf/reward_model/reward_model.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>
#include <rlhf/train/module_state.hpp>
#include <rlhf/train/optimizer.hpp>
#include <rlhf/train/step_callback.hpp>
#include <rlhf/train/trainer_state.hpp>

namespace rlhf {

// ---- data ----

/// One batch of preference pairs: row i of `chosen_ids` was preferred to row i of `rejected_ids`. Each side may be
/// left- or right-padded and the two sides may have different lengths (data::collate_preferences makes them).
using PreferenceBatch = data::PreferenceBatch;

/// A batch of preference pairs: PreferenceBatch, or any struct with the same four tensors (e.g. one from a data
/// loader's collate function).
template <class B>
concept PreferencePairs = requires(const B& batch) {
  { batch.chosen_ids } -> std::convertible_to<torch::Tensor>;
  { batch.chosen_mask } -> std::convertible_to<torch::Tensor>;
  { batch.rejected_ids } -> std::convertible_to<torch::Tensor>;
  { batch.rejected_mask } -> std::convertible_to<torch::Tensor>;
};

/// Encodes preference pairs of texts with encode_for_reward() (BOS-prefixed, right-padded; cut from the left to
/// `max_length` tokens when > 0). `chosen` and `rejected` must have the same number of texts.
inline PreferenceBatch encode_preferences(const GPT2Tokenizer& tokenizer, const std::vector<std::string>& chosen,
                                          const std::vector<std::string>& rejected, int64_t max_length = 0) {
  if (chosen.size() != rejected.size())
    detail::fail("encode_preferences: {} chosen texts but {} rejected (expected one of each per pair)", chosen.size(),
                 rejected.size());
  auto c = encode_for_reward(tokenizer, chosen, true, max_length);
  auto r = encode_for_reward(tokenizer, rejected, true, max_length);
  return {c.input_ids, c.attention_mask, r.input_ids, r.attention_mask};
}

/// The Bradley-Terry preference loss mean_i(-log sigmoid(r_chosen_i - r_rejected_i)) of scores [B] (fp32 scalar).
inline torch::Tensor preference_loss(const torch::Tensor& chosen_scores, const torch::Tensor& rejected_scores) {
  return -torch::log_sigmoid(chosen_scores - rejected_scores).mean();
}

// ---- configuration and statistics ----

/// Hyperparameters of RewardTrainer. The schedule is WarmupDecay over total_steps.
struct RewardTrainConfig {
  uint64_t seed = 1;                      ///< seeds torch's global generator (dropout) when train_dropout is set
  int64_t total_steps = 1000;             ///< optimiser steps of the whole run (for the LR schedule), e.g. 1000
  double lr = 1e-5;                       ///< peak learning rate of the transformer, e.g. 1e-5
  double head_lr = 1e-4;                  ///< peak learning rate of the score head, e.g. 1e-4
  double weight_decay = 0.01;             ///< AdamW weight decay (torch's default)
  int64_t warmup_steps = 0;               ///< steps of linear warmup; must be < total_steps, e.g. 50
  double final_scale = 0.1;               ///< LR multiplier reached by linear decay at the last step
  double max_grad_norm = 1.0;             ///< global gradient-norm clip; 0 = off
  double layer_lr_decay = 1.0;            ///< block i learns at lr x decay^(n_layer - i); 1 = one rate
  FreezeOptions freeze;                   ///< embeddings / first blocks of the transformer kept frozen
  Precision precision = Precision::automatic;  ///< bf16: forwards under bf16 autocast (fp32 weights, optimiser,
                                              ///< loss); auto: bf16 where the device computes bf16 natively
  bool train_dropout = false;             ///< dropout on in training forwards (the model's pdrop values)

  /// Throws rlhf::Error naming the field when a value is out of range.
  void validate() const {
    if (total_steps <= 0) detail::fail("RewardTrainConfig: total_steps must be positive, got {}", total_steps);
    if (warmup_steps < 0 || warmup_steps >= total_steps)
      detail::fail("RewardTrainConfig: warmup_steps ({}) must be in [0, total_steps = {})", warmup_steps,
                   total_steps);
    if (!(lr >= 0)) detail::fail("RewardTrainConfig: lr must be >= 0, got {}", lr);
    if (!(head_lr >= 0)) detail::fail("RewardTrainConfig: head_lr must be >= 0, got {}", head_lr);
    if (!(weight_decay >= 0)) detail::fail("RewardTrainConfig: weight_decay must be >= 0, got {}", weight_decay);
    if (!(final_scale >= 0 && final_scale <= 1))
      detail::fail("RewardTrainConfig: final_scale must be in [0, 1], got {}", final_scale);
    if (!(max_grad_norm >= 0))
      detail::fail("RewardTrainConfig: max_grad_norm must be >= 0, got {}", max_grad_norm);
    if (!(layer_lr_decay > 0 && layer_lr_decay <= 1))
      detail::fail("RewardTrainConfig: layer_lr_decay must be in (0, 1], got {}", layer_lr_decay);
  }

  /// LR multiplier at `step` (0-based).
  double lr_scale(int64_t step) const { return WarmupDecay{warmup_steps, total_steps, final_scale}(step); }
};

/// What one training step did.
struct RewardStepStats {
  int64_t step = 0;        ///< 0-based index of the step
  double loss = 0;         ///< mean -log sigmoid(r_chosen - r_rejected)
  double accuracy = 0;     ///< fraction of pairs with r_chosen > r_rejected (before the update)
  double margin = 0;       ///< mean r_chosen - r_rejected
  double grad_norm = 0;    ///< global gradient norm before clipping
  double learning_rate = 0;  ///< transformer learning rate of this step

  /// All numbers as a JSON object.
  nlohmann::json to_json() const {
    return {{"step", step}, {"loss", loss}, {"accuracy", accuracy}, {"margin", margin}, {"grad_norm", grad_norm},
            {"learning_rate", learning_rate}};
  }
};

/// Held-out statistics, over every pair of the evaluated batches.
struct RewardEvalStats {
  double loss = 0;      ///< mean -log sigmoid(r_chosen - r_rejected)
  double accuracy = 0;  ///< fraction of pairs with r_chosen > r_rejected
  double margin = 0;    ///< mean r_chosen - r_rejected
  int64_t n = 0;        ///< pairs evaluated

  /// All numbers as a JSON object.
  nlohmann::json to_json() const { return {{"loss", loss}, {"accuracy", accuracy}, {"margin", margin}, {"n", n}}; }
};

// ---- the trainer ----

/// Trains a RewardModel on preference pairs with the Bradley-Terry loss, AdamW (GroupedAdamW: one group per depth of
/// the transformer, with layer_lr_decay, and one for the head at head_lr), gradient clipping and warmup + linear
/// decay. Losses use raw() scores: normalise the finished model afterwards (RewardModelImpl::normalise_on).
/// `Base`: the transformer type of the reward model (GPT2<> or GPT2<LoRA<...>>; with LoRA only the adapters and
/// the head train).
template <class Base = GPT2<>>
class RewardTrainer {
 public:
  /// Freezes what `config.freeze` names and builds the optimiser over the trainable parameters.
  RewardTrainer(RewardModel<Base> model, RewardTrainConfig config)
      : model_(std::move(model)), config_(std::move(config)) {
    config_.validate();
    if (config_.train_dropout) torch::manual_seed(config_.seed);
    freeze(*model_->base, config_.freeze);
    optimizer_.add_gpt2(*model_->base, config_.lr, config_.layer_lr_decay)
        .add("score", model_->score->parameters(), config_.head_lr)
        .build("RewardTrainer");
  }

  /// One optimiser step on a batch of pairs: row i of `chosen_ids` [B, Tc] (mask [B, Tc]) preferred to row i of
  /// `rejected_ids` [B, Tr] (mask [B, Tr]). Both sides run in one forward (concatenated along the batch, the
  /// shorter side right-padded with masked tokens when Tc != Tr).
  RewardStepStats step(const torch::Tensor& chosen_ids, const torch::Tensor& chosen_mask,
                       const torch::Tensor& rejected_ids, const torch::Tensor& rejected_mask) {
    const int64_t b = check_pair(chosen_ids, chosen_mask, rejected_ids, rejected_mask, "RewardTrainer::step");
    RewardStepStats stats;
    stats.step = step_;
    const double scale = config_.lr_scale(step_);
    optimizer_.set_scale(scale);
    stats.learning_rate = config_.lr * scale;
    if (config_.train_dropout) model_->train();
    else model_->eval();
    auto [ids, mask] = pair_inputs(chosen_ids, chosen_mask, rejected_ids, rejected_mask);  // [2B, T] each
    optimizer_.zero_grad();
    callbacks_.begin([&] {
      return StepInfo{.step = step_, .ids = ids, .attention_mask = mask, .optimizer = &optimizer_.optimizer()};
    });
    torch::Tensor scores;  // [2B]: the chosen rows, then the rejected rows
    {
      AutocastScope autocast(config_.precision, model_->device());
      scores = model_->raw(ids, mask);
    }
    auto chosen = scores.narrow(0, 0, b), rejected = scores.narrow(0, b, b);
    auto loss = preference_loss(chosen, rejected);
    loss.backward();
    stats.grad_norm = optimizer_.clip_grad_norm(config_.max_grad_norm, /*defer_scale=*/callbacks_.empty());
    callbacks_.gradients(stats.grad_norm, config_.max_grad_norm);
    optimizer_.step();
    callbacks_.end();
    model_->eval();
    auto diff = (chosen - rejected).detach();  // [B]
    stats.loss = loss.item<double>();
    stats.accuracy = diff.gt(0).to(torch::kDouble).mean().item<double>();
    stats.margin = diff.to(torch::kDouble).mean().item<double>();
    ++step_;
    return stats;
  }

  /// As above for a PreferenceBatch (or any PreferencePairs).
  template <PreferencePairs Batch>
  RewardStepStats step(const Batch& batch) {
    return step(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask);
  }

  /// Loss, accuracy and margin over every pair of `batches`, without gradients, in eval mode, under the configured
  /// precision.
  template <PreferencePairs Batch>
  RewardEvalStats evaluate(const std::vector<Batch>& batches) {
    torch::NoGradGuard no_grad;
    model_->eval();
    std::vector<torch::Tensor> diffs;
    for (const auto& batch : batches) {
      const int64_t b = check_pair(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask,
                                   "RewardTrainer::evaluate");
      auto [ids, mask] = pair_inputs(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids, batch.rejected_mask);
      AutocastScope autocast(config_.precision, model_->device());
      auto scores = model_->raw(ids, mask);  // [2B]
      diffs.push_back((scores.narrow(0, 0, b) - scores.narrow(0, b, b)).to(torch::kCPU, torch::kDouble));
    }
    if (diffs.empty()) detail::fail("RewardTrainer::evaluate: no batches (expected at least one pair)");
    auto diff = torch::cat(diffs);  // [N]
    return {.loss = -torch::log_sigmoid(diff).mean().item<double>(),
            .accuracy = diff.gt(0).to(torch::kDouble).mean().item<double>(),
            .margin = diff.mean().item<double>(),
            .n = diff.size(0)};
  }

  /// As above for one batch.
  template <PreferencePairs Batch>
  RewardEvalStats evaluate(const Batch& batch) {
    return evaluate(std::vector<Batch>{batch});
  }

  // ---- checkpoints ----

  /// Writes what training has changed into `dir` (created if needed; make the folder atomic yourself, e.g. write to
  /// a temporary folder and rename): reward_model.safetensors (the trainable tensors of the model and its
  /// normalisation buffers, see save_trainable_state), optimizer.pt, trainer_state.json {"step", "format"} and
  /// trainer_rng.safetensors (torch's default generators, which draw the dropout masks). Export
  /// the finished model with RewardModel::save_pretrained.
  void save_state(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    save_trainable_state(*model_, dir / "reward_model.safetensors");
    optimizer_.save(dir / "optimizer.pt");
    save_trainer_rng(dir, model_->device());
    write_trainer_state(dir, {{"step", step_}});
  }

  /// Restores a state written by save_state() into this trainer, which must have been built as the saved one was:
  /// same starting model (frozen weights are not in the checkpoint), adapters, frozen layers and config.
  void load_state(const std::filesystem::path& dir) {
    const auto state = read_trainer_state(dir, "RewardTrainer::load_state");
    load_trainable_state(*model_, dir / "reward_model.safetensors");
    optimizer_.load(dir / "optimizer.pt");
    load_trainer_rng(dir, model_->device(), "RewardTrainer::load_state");
    step_ = state["step"].get<int64_t>();
  }

  // ---- callbacks ----

  /// Adds a callback that step() calls around each optimiser step (before the forward, after the clipped
  /// gradients, after the update), e.g. an rlhf::ShiftRecorder on `*model()->base`. StepInfo::ids and
  /// attention_mask are the step's one forward, [2B, T]: row i < B is pair i's chosen text, row B + i its rejected
  /// text, so a datum is one text of a pair (padding masked).
  void add_callback(std::shared_ptr<StepCallback> callback) { callbacks_.add(std::move(callback), "RewardTrainer"); }
  /// Removes a callback added with add_callback() (nothing when it is not there).
  void remove_callback(const std::shared_ptr<StepCallback>& callback) { callbacks_.remove(callback); }

  RewardModel<Base>& model() { return model_; }
  const RewardTrainConfig& config() const { return config_; }
  GroupedAdamW& optimizer() { return optimizer_; }
  /// Steps completed.
  int64_t step_count() const { return step_; }

 private:
  /// Checks the shapes of a pair batch; returns B.
  static int64_t check_pair(const torch::Tensor& c_ids, const torch::Tensor& c_mask, const torch::Tensor& r_ids,
                            const torch::Tensor& r_mask, const char* who) {
    auto check = [&](const torch::Tensor& ids, const torch::Tensor& mask, const char* side) {
      if (!ids.defined() || ids.dim() != 2)
        detail::fail("{}: {}_ids must be [batch, seq] int64, got {}", who, side,
                     ids.defined() ? detail::format_shape(ids.sizes()) : "an undefined tensor");
      if (!mask.defined() || mask.sizes() != ids.sizes())
        detail::fail("{}: {}_mask must have the shape of {}_ids {}, got {}", who, side, side,
                     detail::format_shape(ids.sizes()),
                     mask.defined() ? detail::format_shape(mask.sizes()) : "an undefined tensor");
    };
    check(c_ids, c_mask, "chosen");
    check(r_ids, r_mask, "rejected");
    if (c_ids.size(0) != r_ids.size(0) || c_ids.size(0) == 0)
      detail::fail("{}: {} chosen rows and {} rejected rows (expected the same positive number: one pair per row)",
                   who, c_ids.size(0), r_ids.size(0));
    return c_ids.size(0);
  }

  /// The one forward's input of a pair batch: ids and mask [2B, max(Tc, Tr)] on the model's device, the chosen rows
  /// first, the shorter side right-padded with masked tokens.
  std::pair<torch::Tensor, torch::Tensor> pair_inputs(const torch::Tensor& c_ids, const torch::Tensor& c_mask,
                                                      const torch::Tensor& r_ids, const torch::Tensor& r_mask) {
    const int64_t t = std::max(c_ids.size(1), r_ids.size(1));
    auto pad = [&](const torch::Tensor& x) {  // right-pad [B, T'] to [B, t] with 0 (masked tokens)
      return x.size(1) == t ? x.to(torch::kLong) : torch::constant_pad_nd(x.to(torch::kLong), {0, t - x.size(1)}, 0);
    };
    const auto device = model_->device();
    return {torch::cat({pad(c_ids), pad(r_ids)}, 0).to(device), torch::cat({pad(c_mask), pad(r_mask)}, 0).to(device)};
  }

  RewardModel<Base> model_;
  RewardTrainConfig config_;
  GroupedAdamW optimizer_{config_.weight_decay};
  int64_t step_ = 0;
  StepCallbacks callbacks_;
};

}  // namespace rlhf
