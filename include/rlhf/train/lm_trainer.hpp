#pragma once
/// @file LMTrainer: next-token language-model training of a GPT-2-style model, for pretraining (every token after the
/// first is a target) and supervised fine-tuning (only the completion tokens and the EOS are targets): the mean
/// cross-entropy over the target tokens, AdamW with per-layer learning rates, warmup-then-decay schedule, gradient
/// clipping, bf16 autocast, evaluation (loss, perplexity) and checkpoints that resume exactly.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/freeze.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/core/logprobs.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/data/collate.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/model/gpt2.hpp>
#include <rlhf/train/optimizer.hpp>
#include <rlhf/train/step_callback.hpp>
#include <rlhf/train/trainer_state.hpp>

namespace rlhf {

// ---- configuration ----

/// Hyperparameters of LMTrainer. Defaults suit fine-tuning a small model; set `lr` for the task.
struct LMTrainConfig {
  uint64_t seed = 1;                  ///< seeds torch's default generators (dropout masks) when the trainer is built
  int64_t total_steps = 1000;         ///< optimiser steps of the whole run (for the LR schedule), e.g. 1000
  int64_t batch_size = 8;             ///< sequences per step, e.g. 8: informational, the caller builds the batches
  double lr = 3e-4;                   ///< peak learning rate, e.g. 3e-4 pretraining a tiny model, 1e-5 fine-tuning
                                      ///< GPT-2, 1e-4 for LoRA adapters
  double weight_decay = 0.01;         ///< AdamW decoupled weight decay (torch's default), e.g. 0.01
  std::pair<double, double> betas = {0.9, 0.999};  ///< AdamW moment decay rates, e.g. {0.9, 0.95}
  double eps = 1e-8;                  ///< AdamW denominator epsilon, e.g. 1e-8
  int64_t warmup_steps = 0;           ///< steps of linear warmup, e.g. 100; must be < total_steps
  double final_scale = 0.1;           ///< LR multiplier reached by linear decay at the last step, e.g. 0.1
  double max_grad_norm = 1.0;         ///< global gradient-norm clip, e.g. 1.0; 0 = off
  double layer_lr_decay = 1.0;        ///< block i learns at lr x decay^(n_layer - i), embeddings at
                                      ///< lr x decay^(n_layer + 1), e.g. 0.8; 1 = one rate for the whole model
  FreezeOptions freeze;               ///< parts of the base model kept frozen, e.g. {.embeddings = true}
  Precision precision = Precision::automatic;  ///< bf16: forwards under bf16 autocast (fp32 weights, optimiser,
                                              ///< loss); auto: bf16 where the device computes bf16 natively
  bool train_dropout = true;          ///< dropout on in training steps (the model's *_pdrop); off in evaluate()
  int64_t loss_chunk_rows = 0;        ///< 0: logits of all target positions at once ([N, V] fp32); n > 0: n target
                                      ///< rows at a time, recomputed in the backward pass (token_stats_chunked), so
                                      ///< only [n, V] exists, e.g. 1024 for GPT-2 on long batches

  /// Throws rlhf::Error naming the field when a value is out of range or inconsistent.
  void validate() const {
    if (total_steps <= 0) detail::fail("LMTrainConfig: total_steps must be positive, got {}", total_steps);
    if (batch_size <= 0) detail::fail("LMTrainConfig: batch_size must be positive, got {}", batch_size);
    if (!(lr >= 0)) detail::fail("LMTrainConfig: lr must be >= 0, got {}", lr);
    if (!(weight_decay >= 0)) detail::fail("LMTrainConfig: weight_decay must be >= 0, got {}", weight_decay);
    if (!(betas.first >= 0 && betas.first < 1) || !(betas.second >= 0 && betas.second < 1))
      detail::fail("LMTrainConfig: betas must be in [0, 1), got ({}, {})", betas.first, betas.second);
    if (!(eps > 0)) detail::fail("LMTrainConfig: eps must be positive, got {}", eps);
    if (warmup_steps < 0 || warmup_steps >= total_steps)
      detail::fail("LMTrainConfig: warmup_steps ({}) must be in [0, total_steps = {})", warmup_steps, total_steps);
    if (!(final_scale >= 0 && final_scale <= 1))
      detail::fail("LMTrainConfig: final_scale must be in [0, 1], got {}", final_scale);
    if (!(max_grad_norm >= 0)) detail::fail("LMTrainConfig: max_grad_norm must be >= 0, got {}", max_grad_norm);
    if (!(layer_lr_decay > 0 && layer_lr_decay <= 1))
      detail::fail("LMTrainConfig: layer_lr_decay must be in (0, 1], got {}", layer_lr_decay);
    if (freeze.first_blocks < 0)
      detail::fail("LMTrainConfig: freeze.first_blocks must be >= 0, got {}", freeze.first_blocks);
    if (loss_chunk_rows < 0)
      detail::fail("LMTrainConfig: loss_chunk_rows must be >= 0 (0 = no chunking), got {}", loss_chunk_rows);
  }

  /// LR multiplier at `step` (0-based): linear warmup over warmup_steps, then linear decay to final_scale at
  /// total_steps (WarmupDecay).
  double lr_scale(int64_t step) const { return WarmupDecay{warmup_steps, total_steps, final_scale}(step); }
};

// ---- statistics ----

/// What one training step did.
struct LMStepStats {
  int64_t step = 0;              ///< 0-based index of the step
  double loss = 0;               ///< mean cross-entropy (nats) over the target tokens, before the update
  int64_t tokens = 0;            ///< target tokens in the batch
  int64_t input_tokens = 0;      ///< real (unpadded) tokens the forward pass read
  double grad_norm = 0;          ///< global gradient norm before clipping
  double lr = 0;                 ///< learning rate of this step (config lr x schedule; the top layer's rate)
  double seconds = 0;            ///< wall time of the step
  double tokens_per_second = 0;  ///< input_tokens / seconds

  /// All numbers as a JSON object.
  nlohmann::json to_json() const {
    return {{"step", step}, {"loss", loss}, {"tokens", tokens}, {"input_tokens", input_tokens},
            {"grad_norm", grad_norm}, {"lr", lr}, {"seconds", seconds}, {"tokens_per_second", tokens_per_second}};
  }
};

/// What an evaluation over batches measured.
struct LMEvalStats {
  double loss = 0;        ///< mean cross-entropy (nats) per target token over all batches
  double perplexity = 0;  ///< exp(loss)
  int64_t tokens = 0;     ///< target tokens counted
  int64_t batches = 0;    ///< batches read
  double seconds = 0;     ///< wall time

  /// All numbers as a JSON object.
  nlohmann::json to_json() const {
    return {{"loss", loss}, {"perplexity", perplexity}, {"tokens", tokens}, {"batches", batches},
            {"seconds", seconds}};
  }
};

// ---- the trainer ----

/// A language model LMTrainer can train: a module holder (`M::Impl`, `M::Impl::AdapterPolicy`) whose module maps
/// ids and attention mask [B, T] to final hidden states [B, T, D] (`forward(ids, mask)`), hidden states to fp32
/// logits (`logits(hidden)`), has GPT-2 parameter names and `config().n_layer` (freezing, per-layer rates),
/// `device()`, and saves / loads as a GPT-2 folder (`save_pretrained(dir)`, `load_gpt2_weights(impl, file)`).
template <class M>
concept LanguageModel = requires(const M& holder, typename M::Impl& impl, const torch::Tensor& t,
                                 const std::filesystem::path& dir, const SafetensorsFile& file) {
  typename M::Impl::AdapterPolicy;
  { impl.forward(t, t) } -> std::convertible_to<torch::Tensor>;
  { impl.logits(t) } -> std::convertible_to<torch::Tensor>;
  { impl.config().n_layer } -> std::convertible_to<int64_t>;
  { impl.config().vocab_size } -> std::convertible_to<int64_t>;
  { impl.device() } -> std::convertible_to<torch::Device>;
  holder.save_pretrained(dir);
  load_gpt2_weights(impl, file);
};

/// Next-token language-model training (pretraining and supervised fine-tuning) of `Model`, a LanguageModel such as
/// GPT2<> (full fine-tuning: every parameter not frozen by LMTrainConfig::freeze trains) or GPT2<LoRA<8>> (only the
/// adapters train: LoRA freezes the base weights).
///
/// Each step() minimises the mean cross-entropy over the target tokens of a batch,
///   loss = -(1 / N) sum_{b, t : loss_mask[b, t] = 1} log p(ids[b, t] | ids[b, < t]),
/// with AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) at lr x WarmupDecay(step), after clipping the global
/// gradient norm. Only the hidden states of positions that predict a target go through the output projection.
template <class Model = GPT2<>>
class LMTrainer {
  static_assert(LanguageModel<Model>,
                "LMTrainer: the Model slot needs a GPT-2-style module holder (LanguageModel): Impl::forward(ids, "
                "mask) -> hidden [B, T, D], Impl::logits(hidden), Impl::config().n_layer, Impl::device(), "
                "save_pretrained(dir) and load_gpt2_weights(impl, file), e.g. rlhf::GPT2<> or rlhf::GPT2<LoRA<8>>");

 public:
  /// Trains `model` (shared, not copied: the caller's holder sees the updates). Validates `config`, freezes what
  /// config.freeze names, builds AdamW over the trainable parameters (one group per depth for layer_lr_decay) and
  /// seeds torch's default generators with config.seed. Throws when nothing is trainable.
  explicit LMTrainer(Model model, LMTrainConfig config = {})
      : model_(std::move(model)),
        config_(std::move(config)),
        optimizer_(config_.weight_decay, config_.betas, config_.eps) {
    config_.validate();
    if (model_.is_empty()) detail::fail("LMTrainer: the model holder is empty");
    freeze(*model_, config_.freeze);
    optimizer_.add_gpt2(*model_, config_.lr, config_.layer_lr_decay).build("LMTrainer");
    torch::manual_seed(config_.seed);
  }

  // ---- training ----

  /// One optimiser step on a batch: `ids`, `attention_mask`, `loss_mask` all [B, T] (T >= 2), right-padded;
  /// loss_mask[b, t] = 1 makes token t a target, predicted from positions < t (position 0 never is; padded
  /// positions must not be). The forward pass runs under bf16 autocast when config.precision is bf16; the loss is
  /// fp32. Throws rlhf::Error for bad shapes, token ids outside the vocabulary, or a batch without targets.
  LMStepStats step(const torch::Tensor& ids, const torch::Tensor& attention_mask, const torch::Tensor& loss_mask) {
    const auto start = std::chrono::steady_clock::now();
    const auto in = prepare("LMTrainer::step", ids, attention_mask, loss_mask);
    if (in.targets == 0)
      detail::fail("LMTrainer::step: the batch has no target tokens (loss_mask is 0 at every position after the "
                   "first) ---> HINT: loss_mask[b, t] = 1 marks token t as a target; for SFT mark the completion "
                   "and its EOS");
    model_->train(config_.train_dropout);
    LMStepStats stats;
    stats.step = step_;
    stats.tokens = in.targets;
    stats.input_tokens = in.input_tokens;
    const double scale = config_.lr_scale(step_);
    optimizer_.set_scale(scale);
    optimizer_.zero_grad();
    callbacks_.begin([&] {
      return StepInfo{.step = step_, .ids = in.ids, .attention_mask = in.attention_mask, .loss_mask = in.loss_mask,
                      .optimizer = &optimizer_.optimizer()};
    });
    auto loss = target_nll(in).div(static_cast<double>(in.targets));  // [] fp32
    loss.backward();
    stats.grad_norm = optimizer_.clip_grad_norm(config_.max_grad_norm, /*defer_scale=*/callbacks_.empty());
    callbacks_.gradients(stats.grad_norm, config_.max_grad_norm);
    optimizer_.step();
    callbacks_.end();
    stats.loss = loss.template item<double>();
    stats.lr = config_.lr * scale;
    ++step_;
    stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    stats.tokens_per_second = stats.seconds > 0 ? static_cast<double>(stats.input_tokens) / stats.seconds : 0.0;
    return stats;
  }

  /// step() on a batch from data::collate_windows() (pretraining) or data::collate_sft() (fine-tuning).
  LMStepStats step(const data::LMBatch& batch) { return step(batch.ids, batch.attention_mask, batch.loss_mask); }

  // ---- evaluation ----

  /// Mean cross-entropy per target token over all `batches` (each as for step(); a batch may have no targets, all
  /// together must have some), and its perplexity, without gradients and with dropout off (eval mode; the previous
  /// mode is restored). Uses config.precision.
  LMEvalStats evaluate(const std::vector<data::LMBatch>& batches) {
    const auto start = std::chrono::steady_clock::now();
    if (batches.empty()) detail::fail("LMTrainer::evaluate: no batches");
    torch::NoGradGuard no_grad;
    const bool was_training = model_->is_training();
    model_->eval();
    struct RestoreMode {
      typename Model::Impl& model;
      bool training;
      ~RestoreMode() { model.train(training); }
    } restore{*model_, was_training};
    double nll = 0;
    LMEvalStats stats;
    for (const auto& batch : batches) {
      const auto in = prepare("LMTrainer::evaluate", batch.ids, batch.attention_mask, batch.loss_mask);
      if (in.targets > 0) nll += target_nll(in).template item<double>();
      stats.tokens += in.targets;
      ++stats.batches;
    }
    if (stats.tokens == 0)
      detail::fail("LMTrainer::evaluate: the {} batches have no target tokens (loss_mask is 0 at every position "
                   "after the first)",
                   stats.batches);
    stats.loss = nll / static_cast<double>(stats.tokens);
    stats.perplexity = std::exp(stats.loss);
    stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return stats;
  }

  /// evaluate() on one batch.
  LMEvalStats evaluate(const data::LMBatch& batch) { return evaluate(std::vector<data::LMBatch>{batch}); }

  /// evaluate() on one batch given as its three tensors.
  LMEvalStats evaluate(const torch::Tensor& ids, const torch::Tensor& attention_mask,
                       const torch::Tensor& loss_mask) {
    return evaluate(std::vector<data::LMBatch>{{ids, attention_mask, loss_mask}});
  }

  // ---- callbacks ----

  /// Adds a callback that step() calls around each optimiser step (before the forward, after the clipped
  /// gradients, after the update), e.g. an rlhf::ShiftRecorder. Datum b of a step is row b of its batch.
  void add_callback(std::shared_ptr<StepCallback> callback) { callbacks_.add(std::move(callback), "LMTrainer"); }
  /// Removes a callback added with add_callback() (nothing when it is not there).
  void remove_callback(const std::shared_ptr<StepCallback>& callback) { callbacks_.remove(callback); }

  // ---- access ----

  /// Steps taken (also the index of the next step, which sets its learning rate).
  int64_t step_count() const { return step_; }
  /// The model being trained.
  Model& model() { return model_; }
  /// The optimiser (parameter groups, learning rates, state).
  GroupedAdamW& optimizer() { return optimizer_; }
  /// The configuration the trainer was built with.
  const LMTrainConfig& config() const { return config_; }

  // ---- checkpoints ----

  /// Writes the trainer's state into the folder `dir` (created if missing; the caller makes the folder atomic, e.g.
  /// by writing a temporary folder and renaming it): the model as a GPT-2 folder (config.json, model.safetensors),
  /// for an adapter model also its adapters (adapter_config.json, adapter_model.safetensors), the optimiser state
  /// (optimizer.pt), trainer_state.json {"step": n} and trainer_rng.safetensors: torch's default CPU generator (and
  /// the CUDA generator of the model's device), which draws the dropout masks, so that a resumed run is exact.
  void save_state(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    model_.save_pretrained(dir);
    if constexpr (has_adapters_v<Model>) save_adapters(*model_, dir);
    optimizer_.save(dir / "optimizer.pt");
    write_trainer_state(dir, {{"step", step_}});
    save_trainer_rng(dir, model_->device());
  }

  /// Restores a state written by save_state() into this trainer, which must have been built as the saved one was
  /// (same architecture, adapters, frozen layers and config): the weights are copied into the existing model in
  /// place (each keeps its dtype and device), then the optimiser state, the step count and torch's default
  /// generators (a global side effect, as for any resume that continues the dropout stream).
  void load_state(const std::filesystem::path& dir) {
    const auto state = read_trainer_state(dir, "LMTrainer::load_state");
    load_gpt2_weights(*model_, SafetensorsFile(dir / "model.safetensors"));
    if constexpr (has_adapters_v<Model>) load_adapters(*model_, dir);
    optimizer_.load(dir / "optimizer.pt");
    load_trainer_rng(dir, model_->device(), "LMTrainer::load_state");
    step_ = state["step"].get<int64_t>();
  }

 private:
  /// A batch checked and moved to the model's device.
  struct Prepared {
    torch::Tensor ids, attention_mask, loss_mask;  // [B, T] int64
    int64_t targets = 0;                           // target tokens (loss_mask[:, 1:] nonzero)
    int64_t input_tokens = 0;                      // real tokens
  };

  /// Checks shapes, dtypes, token range and mask consistency; `who` starts every message.
  Prepared prepare(const char* who, const torch::Tensor& ids, const torch::Tensor& attention_mask,
                   const torch::Tensor& loss_mask) {
    auto shape = [](const torch::Tensor& t) {
      return t.defined() ? detail::format_shape(t.sizes()) : std::string("an undefined tensor");
    };
    auto is_integer = [](const torch::Tensor& t) {
      return !t.is_floating_point() && !t.is_complex() && t.scalar_type() != torch::kBool;
    };
    if (!ids.defined() || ids.dim() != 2 || !is_integer(ids))
      detail::fail("{}: ids must be a [batch, seq] integer tensor, got {}{}", who, shape(ids),
                   ids.defined() ? fmt::format(" of {}", c10::toString(ids.scalar_type())) : "");
    if (ids.size(0) == 0 || ids.size(1) < 2)
      detail::fail("{}: ids must have at least 1 row and 2 positions (position 0 is only context), got {}", who,
                   shape(ids));
    for (auto [mask, name] : {std::pair{&attention_mask, "attention_mask"}, std::pair{&loss_mask, "loss_mask"}}) {
      if (!mask->defined() || mask->sizes() != ids.sizes())
        detail::fail("{}: {} must have the shape of ids {}, got {}", who, name, shape(ids), shape(*mask));
      if (mask->is_floating_point() || mask->is_complex())
        detail::fail("{}: {} must be an integer or bool tensor, got {}", who, name,
                     c10::toString(mask->scalar_type()));
    }
    const auto device = model_->device();
    Prepared out;
    out.ids = ids.to(device, torch::kLong);
    out.attention_mask = attention_mask.to(device, torch::kLong);
    out.loss_mask = loss_mask.ne(0).to(device, torch::kLong);
    const int64_t vocab = model_->config().vocab_size;
    auto bad = out.ids.lt(0).logical_or(out.ids.ge(vocab));  // [B, T]
    if (bad.any().template item<bool>())
      detail::fail("{}: token ids must lie in [0, {}) (the model's vocab_size), found {}", who, vocab,
                   out.ids.masked_select(bad)[0].template item<int64_t>());
    auto first = out.loss_mask.select(1, 0);  // [B]
    if (first.any().template item<bool>())
      detail::fail("{}: loss_mask marks position 0 of row {} as a target, but position 0 has no context to be "
                   "predicted from ---> HINT: loss_mask[b, t] = 1 means token t is predicted from tokens < t; mark "
                   "the completion and its EOS, never the first token",
                   who, first.nonzero()[0][0].template item<int64_t>());
    auto padded = out.loss_mask.ne(0).logical_and(out.attention_mask.eq(0));  // [B, T]
    if (padded.any().template item<bool>()) {
      auto at = padded.nonzero()[0];
      detail::fail("{}: loss_mask marks row {} position {} as a target, but attention_mask is 0 there (padding)",
                   who, at[0].template item<int64_t>(), at[1].template item<int64_t>());
    }
    out.targets = out.loss_mask.sum().template item<int64_t>();
    out.input_tokens = out.attention_mask.ne(0).sum().template item<int64_t>();
    return out;
  }

  /// Sum over the batch's targets of -log p(target | context): an fp32 scalar (differentiable under grad mode).
  torch::Tensor target_nll(const Prepared& in) {
    const int64_t t = in.ids.size(1);
    const auto device = model_->device();
    torch::Tensor hidden;  // [B, T, D] fp32
    {
      AutocastScope autocast(config_.precision, device);
      // The loss goes through the tied output projection: the embedding's gradient can be sparse, added in place.
      SparseEmbeddingGrad sparse_embedding(*model_);
      hidden = model_->forward(in.ids, in.attention_mask);
    }
    auto is_target = in.loss_mask.narrow(1, 1, t - 1).ne(0);                 // [B, T-1]: token t + 1 is a target
    auto predicting = hidden.narrow(1, 0, t - 1).index({is_target});        // [N, D]: the positions predicting one
    auto targets = in.ids.narrow(1, 1, t - 1).index({is_target});           // [N]
    torch::Tensor logprobs;                                                  // [N] fp32
    if (config_.loss_chunk_rows > 0) {
      auto project = [model = model_, precision = config_.precision, device](const torch::Tensor& rows) mutable {
        AutocastScope autocast(precision, device);
        return model->logits(rows);  // [n, V]
      };
      logprobs = token_stats_chunked(predicting, project, targets, 1.0, config_.loss_chunk_rows).logprobs;
    } else {
      torch::Tensor logits;  // [N, V] fp32
      {
        AutocastScope autocast(config_.precision, device);
        logits = model_->logits(predicting);
      }
      logprobs = gather_logprobs(logits, targets);
    }
    return -logprobs.sum();
  }

  Model model_;
  LMTrainConfig config_;
  GroupedAdamW optimizer_;
  int64_t step_ = 0;
  StepCallbacks callbacks_;
};

/// Language-model training of a plain GPT-2 (full fine-tuning or pretraining from scratch).
using GPT2LMTrainer = LMTrainer<GPT2<>>;

}  // namespace rlhf
