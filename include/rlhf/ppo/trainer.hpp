#pragma once
/// @file PPOTrainer: PPO for language models (Schulman et al. 2017, arXiv 1707.06347) with a KL penalty against a
/// frozen reference model (Ziegler et al. 2019, arXiv 1909.08593), as the seed notebook runs it.

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/freeze.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/core/advantages.hpp>
#include <rlhf/core/logprobs.hpp>
#include <rlhf/core/projected_stats.hpp>
#include <rlhf/core/masked.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/core/softmax_stats.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/generation/sampling.hpp>
#include <rlhf/model/actor_critic.hpp>
#include <rlhf/ppo/config.hpp>
#include <rlhf/ppo/kl.hpp>
#include <rlhf/ppo/losses.hpp>
#include <rlhf/rewards/reward.hpp>
#include <rlhf/runtime.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/train/module_state.hpp>
#include <rlhf/train/optimizer.hpp>
#include <rlhf/train/step_callback.hpp>
#include <rlhf/train/trainer_state.hpp>
#include <rlhf/tokenizer/batch_encode.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>

namespace rlhf {

/// A PPO policy: a module holder around an ActorCriticImpl-like module with `base` (a BaseModel), `values(hidden)`,
/// `forward(ids, mask)` and the parameter lists of the two learning-rate groups.
template <class P>
concept PolicyModel = requires(typename P::Impl& impl, const torch::Tensor& t) {
  typename P::Impl::BaseType;
  requires BaseModel<typename P::Impl::BaseType>;
  { impl.forward(t, t) } -> std::convertible_to<torch::Tensor>;
  { impl.values(t) } -> std::convertible_to<torch::Tensor>;
  { impl.base_parameters() } -> std::convertible_to<std::vector<torch::Tensor>>;
  { impl.head_parameters() } -> std::convertible_to<std::vector<torch::Tensor>>;
};

/// What one phase (rollout + learning) did. Means are over the phase's samples (rollout statistics) or over its
/// minibatch updates (learning statistics).
struct PhaseStats {
  int64_t phase = 0;               ///< 0-based index of the phase
  double reward_mean = 0;          ///< raw scores from the reward
  double reward_std = 0;
  double reward_norm_mean = 0;     ///< scores after normalisation, scaling and clipping
  double reward_norm_std = 0;
  double kl = 0;                   ///< mean over samples of the summed per-token KL estimate to the reference
  double kl_coef = 0;              ///< KL coefficient used in this phase
  double entropy = 0;              ///< mean per-token entropy of the policy (temperature-scaled)
  double policy_loss = 0;
  double value_loss = 0;
  double kl_loss = 0;              ///< mean full-vocabulary KL term (KLPlacement::loss), before kl_coef
  double clip_fraction = 0;        ///< fraction of tokens whose ratio was clipped
  double value_clip_fraction = 0;  ///< fraction of values clipped (clip_value set)
  double approx_kl = 0;            ///< 0.5 E[(log pi - log pi_old)^2]
  double explained_variance = 0;   ///< of the returns by the rollout values
  double learning_rate = 0;        ///< base-model learning rate of this phase
  int64_t updates = 0;             ///< optimiser steps taken (fewer than planned after a target-KL stop)
  /// Wall time of each stage; on a GPU each stage is timed to the end of the work it queued.
  double seconds_generation = 0, seconds_reward = 0, seconds_reference = 0, seconds_training = 0;
  double tokens_per_second = 0;    ///< generated tokens / seconds of the whole phase
  std::vector<std::string> samples;  ///< a few decoded completions

  /// All numbers as a JSON object (samples included).
  nlohmann::json to_json() const {
    return {{"phase", phase}, {"reward_mean", reward_mean}, {"reward_std", reward_std},
            {"reward_norm_mean", reward_norm_mean}, {"reward_norm_std", reward_norm_std}, {"kl", kl},
            {"kl_coef", kl_coef}, {"entropy", entropy}, {"policy_loss", policy_loss}, {"value_loss", value_loss},
            {"kl_loss", kl_loss}, {"clip_fraction", clip_fraction}, {"value_clip_fraction", value_clip_fraction},
            {"approx_kl", approx_kl}, {"explained_variance", explained_variance},
            {"learning_rate", learning_rate}, {"updates", updates}, {"seconds_generation", seconds_generation},
            {"seconds_reward", seconds_reward}, {"seconds_reference", seconds_reference},
            {"seconds_training", seconds_training}, {"tokens_per_second", tokens_per_second},
            {"samples", samples}};
  }
};

namespace detail {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Log-probabilities [B, G] of `tokens` [B, G] under logits(hidden [B, G, D]) / temperature, computed `chunk` rows
/// at a time so the [B, G, V] logits never exist at once (on a CPU with AVX-512 in two passes over each row, by the
/// kernels of core/softmax_stats.hpp).
template <class Base>
torch::Tensor chunked_logprobs(Base& base, const torch::Tensor& hidden, const torch::Tensor& tokens,
                               double temperature, int64_t chunk) {
  std::vector<torch::Tensor> parts;
  for (int64_t start = 0; start < hidden.size(0); start += chunk) {
    const int64_t n = std::min(chunk, hidden.size(0) - start);
    auto logits = base.logits(hidden.narrow(0, start, n));  // [n, G, V]
    auto picked = tokens.narrow(0, start, n);
    auto rows = logits.reshape({-1, logits.size(-1)});
    if (softmax_stats_kernels_apply(rows, torch::Tensor())) {  // the kernels index the row by token: check them
      ppo_math::check_token_range("chunked_logprobs", picked, rows.size(1));
      parts.push_back(softmax_stats_forward(rows, picked.reshape({-1}), torch::Tensor(), temperature)
                          .logprob.view(picked.sizes()));
      continue;
    }
    logits = logits / temperature;
    parts.push_back(logits.gather(-1, picked.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1));
  }
  return torch::cat(parts, 0);
}

/// `model`'s final-layernorm outputs [B, G, D] at the G positions that predict the generated tokens of `ids`
/// [B, P + G] (`mask` alike). The last token predicts none of them, so the forward leaves it out: causal attention
/// keeps every other position as it was, and 1/(P + G) of the forward's work is saved.
template <class Model>
torch::Tensor response_hidden(Model& model, const torch::Tensor& ids, const torch::Tensor& mask, int64_t p,
                              int64_t g) {
  const int64_t t = p + g - 1;
  return model.forward(ids.narrow(1, 0, t), mask.narrow(1, 0, t)).narrow(1, p - 1, g);
}

/// What the learning epochs need of a phase's rollout (all [B, ...], on the policy's device).
struct RolloutData {
  torch::Tensor ids, attention_mask;  // [B, P + G]
  torch::Tensor tokens, mask;         // [B, G] generated tokens, 1 = generated
  torch::Tensor old_logprobs, old_values, advantages, returns;  // [B, G]
  torch::Tensor ref_hidden;           // [B, G, D] reference final-layernorm outputs
  int64_t p = 0, g = 0;               // prompt length, generated length
};

struct MinibatchTerms {
  torch::Tensor loss;
  PolicyLossOutput pg;
  ValueLossOutput vf;
  torch::Tensor entropy;  // masked mean
  torch::Tensor kl_term;  // full-vocabulary KL (KLPlacement::loss only)
  torch::Tensor ref_logprobs;  // [mb, G] the reference's log-probs of the tokens (KLPlacement::loss only)
};

template <class KLCtl>
KLCtl kl_controller_from_coef(double coef) {
  if constexpr (std::is_same_v<KLCtl, FixedKL>) {
    return FixedKL{{.coef = coef}};
  } else if constexpr (std::is_same_v<KLCtl, AdaptiveKL>) {
    return AdaptiveKL{{.init = coef}};
  } else {
    static_assert(std::is_constructible_v<KLCtl, double>,
                  "PPOTrainer: pass the KL controller to the constructor, or give it a constructor from the "
                  "initial coefficient (double)");
    return KLCtl(coef);
  }
}

}  // namespace detail

/// PPO trainer for language models. One `step()` is one phase: sample `batch_size` continuations with the KV cache,
/// score them, compute reference log-probs and values without gradients, shape rewards and advantages, then run
/// `batches_per_learning_phase` epochs of shuffled minibatch updates of the clipped surrogate + value loss -
/// entropy bonus (+ full-vocabulary KL term), with AdamW (base / value-head parameter groups), gradient clipping and
/// warmup + linear decay of the learning rate.
///
/// `Policy`: a PolicyModel (e.g. ActorCritic<GPT2<>, MLPValueHead>); `RewardFn`: a Reward; `KLCtl`: a
/// KLController (FixedKL or AdaptiveKL). For full fine-tuning the reference is a frozen copy of the base model; when
/// the base model's adapter policy has adapters (e.g. GPT2<LoRA<8>>), the reference is the policy's own base with
/// its adapters disabled (AdaptersDisabled), so no second copy of the weights exists.
template <class Policy, class RewardFn, class KLCtl = AdaptiveKL>
class PPOTrainer {
  static_assert(PolicyModel<Policy>, "PPOTrainer: the Model slot needs a PolicyModel (e.g. rlhf::ActorCritic<>): "
                                     "forward(ids, mask), values(hidden), base_parameters(), head_parameters()");
  static_assert(Reward<RewardFn>, "PPOTrainer: the Reward slot needs operator()(const rlhf::Rollout&) returning "
                                  "a [B] tensor of scores (wrap a callable in rlhf::FunctionReward)");
  static_assert(KLController<KLCtl>, "PPOTrainer: the KL controller slot needs value() -> double and "
                                     "update(double kl, int64_t n_steps)");

 public:
  using Base = typename Policy::Impl::BaseType;
  /// True when the reference is the policy's base with adapters disabled rather than a frozen copy.
  static constexpr bool kSharedReference = has_adapters_v<Base>;
  /// Called after every phase with its statistics: logging, checkpoints, recording, early stopping.
  using Callback = std::function<void(const PhaseStats&, PPOTrainer&)>;

  /// `tokenizer` turns prompts into ids and samples into text for the reward.
  PPOTrainer(Policy policy, RewardFn reward, KLCtl kl, PPOConfig config, GPT2Tokenizer tokenizer)
      : policy_(std::move(policy)),
        reward_(std::move(reward)),
        kl_(std::move(kl)),
        config_(std::move(config)),
        tokenizer_(std::move(tokenizer)),
        shuffle_(at::make_generator<at::CPUGeneratorImpl>(config_.seed)) {
    config_.validate();
    const int64_t model_vocab = policy_->base->config().vocab_size;
    if (model_vocab > tokenizer_.vocab_size())
      detail::fail("PPOTrainer: the model's vocab_size ({}) exceeds the tokenizer's ({}): samples could hold ids the "
                   "tokenizer cannot decode for the reward ---> HINT: load the tokenizer that belongs to the model",
                   model_vocab, tokenizer_.vocab_size());
    if constexpr (!kSharedReference) {
      auto& base = *policy_->base;
      reference_ = Base(base.config());
      reference_->place(base.device(), config_.reference_bf16 ? torch::kBFloat16 : base.dtype());
      copy_parameters(base, *reference_);
      for (auto& p : reference_->parameters()) p.requires_grad_(false);
      reference_->eval();
    }
    freeze(*policy_->base, config_.freeze);
    build_optimizer();
  }

  /// As above with the KL controller built from `config.kl_coef`.
  PPOTrainer(Policy policy, RewardFn reward, PPOConfig config, GPT2Tokenizer tokenizer)
      : PPOTrainer(std::move(policy), std::move(reward), detail::kl_controller_from_coef<KLCtl>(config.kl_coef),
                   config, std::move(tokenizer)) {}

  /// One phase on `batch_size` copies of `config.prefix`.
  PhaseStats step() { return step(std::vector<std::string>(config_.batch_size, config_.prefix)); }

  /// One phase on these prompts (exactly batch_size of them).
  PhaseStats step(const std::vector<std::string>& prompts) {
    if (static_cast<int64_t>(prompts.size()) != config_.batch_size)
      detail::fail("PPOTrainer::step: got {} prompts, PPOConfig::batch_size is {}", prompts.size(),
                   config_.batch_size);
    auto batch = encode_batch(tokenizer_, prompts, tokenizer_.eos_id(), false, config_.prepend_bos);
    return run_phase(batch.input_ids, batch.attention_mask, prompts);
  }

  /// Adds a callback run after every phase.
  void on_phase_end(Callback callback) { callbacks_.push_back(std::move(callback)); }

  /// Adds a callback called around each minibatch update (before its forward, after its clipped gradients, after
  /// the AdamW step), e.g. an rlhf::ShiftRecorder. StepInfo::ids and attention_mask are the minibatch's rollout
  /// rows [mb, P + G] (datum b = row b: one prompt and its completion), loss_mask marks the generated tokens, and
  /// StepInfo::step numbers the updates phase x updates_per_phase + index, so steps stay unique across phases.
  void add_callback(std::shared_ptr<StepCallback> callback) { step_callbacks_.add(std::move(callback), "PPOTrainer"); }
  /// Removes a callback added with add_callback() (nothing when it is not there).
  void remove_callback(const std::shared_ptr<StepCallback>& callback) { step_callbacks_.remove(callback); }

  Policy& policy() { return policy_; }
  /// The frozen copy of the initial base model (full fine-tuning only: an adapter policy has no copy).
  Base& reference()
    requires(!kSharedReference)
  {
    return reference_;
  }
  KLCtl& kl_controller() { return kl_; }
  const PPOConfig& config() const { return config_; }
  const GPT2Tokenizer& tokenizer() const { return tokenizer_; }
  torch::optim::AdamW& optimizer() { return optimizer_.optimizer(); }
  /// Phases completed.
  int64_t phase() const { return phase_; }
  /// Phases completed (the step counter of the training loop).
  int64_t step_count() const { return phase_; }

  // ---- checkpoints ----

  /// Writes what training has changed into the existing folder `dir` (the caller makes the folder atomic, e.g.
  /// run::RunDir::save_checkpoint): policy.safetensors (the trainable tensors of the policy: base or adapters, and
  /// the value head), optimizer.pt, trainer_state.json (phase, KL controller) and trainer_rng.safetensors (the
  /// minibatch-shuffling generator and torch's default generators, which draw dropout masks with train_dropout).
  /// Sampling needs no state: each phase's draws are seeded from (seed, phase).
  void save_state(const std::filesystem::path& dir) {
    save_trainable_state(*policy_, dir / "policy.safetensors");
    optimizer_.save(dir / "optimizer.pt");
    nlohmann::json state = {{"phase", phase_}};
    if constexpr (requires { kl_.state(); }) state["kl_controller"] = kl_.state();
    write_trainer_state(dir, state);
    save_trainer_rng(dir, policy_->base->device(), {{"shuffle_generator", shuffle_}});
  }

  /// Restores a state written by save_state() into this trainer, which must have been built as the saved one was:
  /// same starting model (the reference is its frozen copy), adapters, frozen layers and config.
  void load_state(const std::filesystem::path& dir) {
    const auto state = read_trainer_state(dir, "PPOTrainer::load_state", "phase");
    load_trainable_state(*policy_, dir / "policy.safetensors");
    optimizer_.load(dir / "optimizer.pt");
    if constexpr (requires(const nlohmann::json& j) { kl_.load_state(j); }) {
      if (!state.contains("kl_controller"))
        detail::fail("PPOTrainer::load_state: {}: missing field 'kl_controller'",
                     (dir / "trainer_state.json").string());
      kl_.load_state(state["kl_controller"]);
    }
    load_trainer_rng(dir, policy_->base->device(), "PPOTrainer::load_state", {{"shuffle_generator", shuffle_}});
    phase_ = state["phase"].get<int64_t>();
  }

 private:
  PhaseStats run_phase(const torch::Tensor& prompt_ids, const torch::Tensor& prompt_mask,
                       const std::vector<std::string>& prompts) {
    const auto phase_start = std::chrono::steady_clock::now();
    auto& base = *policy_->base;
    const auto device = base.device();
    PhaseStats stats;
    stats.phase = phase_;
    stats.kl_coef = kl_.value();

    // ---- rollout ----
    auto start = std::chrono::steady_clock::now();
    SamplingConfig sampling{.max_new_tokens = config_.gen_len, .temperature = config_.temperature,
                            .top_k = config_.top_k, .top_p = config_.top_p, .stop_at_eos = config_.stop_at_eos,
                            .eos_id = tokenizer_.eos_id(), .pad_id = tokenizer_.eos_id(),
                            .seed = config_.seed * 1000003ULL + static_cast<uint64_t>(phase_)};
    const bool from_rollout = !config_.recompute_old_logprobs;
    torch::Tensor old_values;  // [B, G]: the value head on the final-layernorm outputs sampling computes
    if (from_rollout)
      old_values = torch::zeros({prompt_ids.size(0), config_.gen_len}, torch::dtype(torch::kFloat).device(device));
    Generation gen = [&] {
      AutocastScope autocast(config_.precision, device);
      StepHiddenObserver values_of_step;
      if (from_rollout)
        values_of_step = [&](int64_t step, const torch::Tensor& hidden) {  // hidden [B, D]
          old_values.select(1, step).copy_(policy_->values(hidden.unsqueeze(1)).squeeze(1));
        };
      return generate(base, prompt_ids.to(device), prompt_mask.to(device), sampling, values_of_step);
    }();
    synchronize(device);
    stats.seconds_generation = detail::seconds_since(start);
    const int64_t batch = gen.ids.size(0), p = gen.prompt_length, g = config_.gen_len;
    torch::Tensor gen_mask = gen.generated_mask.to(torch::kFloat);  // [B, G]
    torch::Tensor tokens = gen.new_tokens();                // [B, G]

    // ---- reward ----
    start = std::chrono::steady_clock::now();
    Rollout rollout{gen.ids, gen.attention_mask, gen.generated_mask, p, prompts, decode_completions(gen)};
    torch::Tensor raw_scores = check_scores(reward_(rollout), batch);  // [B] fp32 CPU
    stats.reward_mean = raw_scores.mean().item<double>();
    stats.reward_std = batch > 1 ? raw_scores.std().item<double>() : 0.0;
    torch::Tensor scores = raw_scores;
    if (config_.normalize_reward && batch > 1) scores = (scores - scores.mean()) / (scores.std() + 1e-5);
    scores = scores * config_.reward_scale;
    if (config_.reward_clip) scores = scores.clamp(-*config_.reward_clip, *config_.reward_clip);
    stats.reward_norm_mean = scores.mean().item<double>();
    stats.reward_norm_std = batch > 1 ? scores.std().item<double>() : 0.0;
    scores = scores.to(device);
    stats.seconds_reward = detail::seconds_since(start);
    for (int64_t i = 0; i < std::min<int64_t>(batch, 4); ++i) stats.samples.push_back(rollout.completions[i]);

    // ---- reference, old log-probs and values (no gradients) ----
    // The old log-probs and values come from the sampling's forward passes (the policy, in eval mode, at the same
    // positions), or from a second forward when recompute_old_logprobs is set. With the KL in the loss the
    // minibatches project the reference's rows anyway, and the first epoch's statistics give the reference's
    // log-probs of the tokens (the same products, row by row): the reference stage then runs the reference forward
    // alone, and the KL statistics follow the learning epochs.
    start = std::chrono::steady_clock::now();
    const bool kl_in_loss = config_.kl_placement == KLPlacement::loss;
    const int64_t chunk = config_.minibatch_size();
    torch::Tensor old_logprobs = gen.logprobs, ref_logprobs, ref_hidden;  // [B, G]
    {
      torch::NoGradGuard no_grad;
      AutocastScope autocast(config_.precision, device);
      policy_->eval();  // no dropout: an adapter policy's base is also the reference
      if (!from_rollout) {
        auto hidden = detail::response_hidden(*policy_, gen.ids, gen.attention_mask, p, g);  // [B, G, D]
        old_values = policy_->values(hidden);                                              // [B, G]
        old_logprobs = detail::chunked_logprobs(base, hidden, tokens, config_.temperature, chunk);
      }
      ref_hidden = reference_hidden(gen.ids, gen.attention_mask, p, g);
      if (!kl_in_loss) ref_logprobs = reference_logprobs(ref_hidden, tokens, chunk);
    }
    synchronize(device);
    stats.seconds_reference = detail::seconds_since(start);

    // ---- rewards, KL shaping, advantages ----
    auto rewards = torch::zeros_like(old_logprobs);  // [B, G]
    if (!kl_in_loss) {
      torch::Tensor kl_tokens = kl_per_token(old_logprobs, ref_logprobs, config_.kl_estimator) * gen_mask;  // [B, G]
      stats.kl = kl_tokens.sum(1).mean().item<double>();
      rewards = rewards - stats.kl_coef * kl_tokens;
    }
    auto last = (gen_mask.sum(1) - 1).clamp_min(0).to(torch::kLong).unsqueeze(1);  // [B, 1]: last generated token
    rewards.scatter_add_(1, last, scores.unsqueeze(1));
    Advantages adv = gae(rewards, old_values, gen_mask, config_.gamma, config_.lambda);
    torch::Tensor advantages = config_.whiten_advantages ? masked_whiten(adv.advantages, gen_mask) : adv.advantages;
    stats.explained_variance = explained_variance(old_values, adv.returns, gen_mask).item<double>();

    // ---- learning ----
    start = std::chrono::steady_clock::now();
    const detail::RolloutData rollout_data{gen.ids, gen.attention_mask, tokens, gen_mask, old_logprobs, old_values,
                                   advantages, adv.returns, ref_hidden, p, g};
    const double scale = config_.lr_scale(phase_);
    optimizer_.set_scale(scale);
    stats.learning_rate = config_.base_lr * scale;
    policy_->train(config_.train_dropout);  // dropout only when asked, whatever mode the caller left the policy in
    const int64_t mbs = config_.minibatch_size();
    double sum_pg = 0, sum_vf = 0, sum_ent = 0, sum_clip = 0, sum_vclip = 0, sum_akl = 0, sum_kl = 0;
    bool stop = false;
    torch::Tensor ref_seen;  // [B] bool: rows whose reference log-probs the first epoch gave (KL in the loss)
    if (kl_in_loss) {
      ref_logprobs = torch::zeros_like(old_logprobs);
      ref_seen = torch::zeros({batch}, torch::dtype(torch::kBool).device(device));
    }
    for (int64_t epoch = 0; epoch < config_.batches_per_learning_phase && !stop; ++epoch) {
      auto order = torch::randperm(batch, shuffle_, torch::TensorOptions().dtype(torch::kLong)).to(device);
      for (int64_t m = 0; m < config_.num_minibatches; ++m) {
        auto idx = order.narrow(0, m * mbs, mbs);
        step_callbacks_.begin([&] { return minibatch_info(rollout_data, idx, epoch * config_.num_minibatches + m); });
        detail::MinibatchTerms terms = minibatch_loss(rollout_data, idx, stats.kl_coef);
        if (kl_in_loss) {
          sum_kl += terms.kl_term.item<double>();
          if (epoch == 0) {
            ref_logprobs.index_copy_(0, idx, terms.ref_logprobs.to(ref_logprobs.scalar_type()));
            ref_seen.index_fill_(0, idx, true);
          }
        }
        optimizer_.zero_grad();
        terms.loss.backward();
        const double grad_norm =
            optimizer_.clip_grad_norm(config_.max_grad_norm, /*defer_scale=*/step_callbacks_.empty());
        step_callbacks_.gradients(grad_norm, config_.max_grad_norm);
        optimizer_.step();
        step_callbacks_.end();
        ++stats.updates;
        sum_pg += terms.pg.loss.item<double>();
        sum_vf += terms.vf.loss.item<double>();
        sum_ent += terms.entropy.item<double>();
        sum_clip += terms.pg.clip_fraction.item<double>();
        sum_vclip += terms.vf.clip_fraction.item<double>();
        const double akl = terms.pg.approx_kl.item<double>();
        sum_akl += akl;
        if (config_.target_kl && akl > 1.5 * *config_.target_kl) {
          stop = true;
          break;
        }
      }
    }
    // The last update's gradients, dropped now as the next update's zero_grad() would drop them: the next phase's
    // rollout then packs its weights and holds its KV cache in their memory (GPT-2 small: 484 MiB) instead of fresh
    // pages.
    optimizer_.zero_grad();
    policy_->eval();
    if (kl_in_loss) {
      // Rows an early stop kept from the first epoch are projected now.
      auto missing = torch::nonzero(ref_seen.logical_not()).squeeze(1);
      if (missing.numel() > 0)
        ref_logprobs.index_copy_(0, missing,
                                 reference_logprobs(ref_hidden.index_select(0, missing),
                                                    tokens.index_select(0, missing), chunk)
                                     .to(ref_logprobs.scalar_type()));
      auto kl_tokens = kl_per_token(old_logprobs, ref_logprobs, config_.kl_estimator) * gen_mask;  // [B, G]
      stats.kl = kl_tokens.sum(1).mean().item<double>();
    }
    const double n = static_cast<double>(std::max<int64_t>(stats.updates, 1));
    stats.policy_loss = sum_pg / n;
    stats.value_loss = sum_vf / n;
    stats.entropy = sum_ent / n;
    stats.clip_fraction = sum_clip / n;
    stats.value_clip_fraction = sum_vclip / n;
    stats.approx_kl = sum_akl / n;
    stats.kl_loss = sum_kl / n;
    synchronize(device);
    stats.seconds_training = detail::seconds_since(start);

    kl_.update(stats.kl, batch);
    ++phase_;
    const double total = detail::seconds_since(phase_start);
    stats.tokens_per_second = gen_mask.sum().item<double>() / total;
    for (auto& callback : callbacks_) callback(stats, *this);
    return stats;
  }

  // ---- one minibatch ----

  /// The PPO loss of the rollout rows `idx`: clipped surrogate + vf_coef x value loss - ent_coef x entropy
  /// (+ kl_coef x full-vocabulary KL). Forwards run under the configured precision; the terms are fp32.
  detail::MinibatchTerms minibatch_loss(const detail::RolloutData& d, const torch::Tensor& idx, double kl_coef) {
    auto& base = *policy_->base;
    AutocastScope autocast(config_.precision, base.device());
    // The loss goes through the tied output projection: the embedding's gradient can be sparse, added in place.
    SparseEmbeddingGrad sparse_embedding(base);
    detail::MinibatchTerms t;
    torch::Tensor mask = d.mask.index_select(0, idx);
    torch::Tensor hidden = detail::response_hidden(*policy_, d.ids.index_select(0, idx),
                                                   d.attention_mask.index_select(0, idx), d.p, d.g);  // [mb, G, D]
    torch::Tensor values = policy_->values(hidden);                                                  // [mb, G]
    const bool kl_in_loss = config_.kl_placement == KLPlacement::loss;
    auto stats = token_stats(hidden, d.tokens.index_select(0, idx),
                             kl_in_loss ? d.ref_hidden.index_select(0, idx) : torch::Tensor());
    t.entropy = masked_mean(stats.entropy, mask);
    t.pg = clipped_surrogate(stats.logprobs, d.old_logprobs.index_select(0, idx), d.advantages.index_select(0, idx),
                             mask, config_.clip_coef);
    t.vf = value_loss(values, d.old_values.index_select(0, idx), d.returns.index_select(0, idx), mask,
                      config_.clip_value);
    t.loss = t.pg.loss + config_.vf_coef * t.vf.loss - config_.ent_coef * t.entropy;
    if (kl_in_loss) {
      t.kl_term = masked_mean(stats.kl, mask);
      t.loss = t.loss + kl_coef * t.kl_term;
      t.ref_logprobs = stats.ref_logprobs;
    }
    return t;
  }

  /// log p(token), the entropy and the KL to the reference (with `ref_hidden` [mb, G, D] defined) of the policy's
  /// final-layernorm outputs `hidden` [mb, G, D]: through projected_token_stats when both models offer their output
  /// projection (the node keeps the [mb, G, V] logits in the product's dtype and turns them into their own gradient),
  /// else through logits() and policy_token_stats (the fp32 logits kept, and their gradient made beside them).
  PolicyTokenStats token_stats(const torch::Tensor& hidden, const torch::Tensor& tokens,
                               const torch::Tensor& ref_hidden) {
    auto& base = *policy_->base;
    if constexpr (requires { { base.fusable_output_weight() } -> std::convertible_to<torch::Tensor>; }) {
      auto weight = base.fusable_output_weight();
      auto ref_weight = ref_hidden.defined()
                            ? with_reference([](auto& reference) { return reference.fusable_output_weight(); })
                            : torch::Tensor();
      if (weight.defined() && (!ref_hidden.defined() || ref_weight.defined()))
        return projected_token_stats(hidden, weight, tokens, config_.temperature, ref_hidden, ref_weight);
    }
    return policy_token_stats(base.logits(hidden), tokens, config_.temperature,
                              ref_hidden.defined() ? reference_logits(ref_hidden) : torch::Tensor());
  }

  /// What step callbacks see of minibatch update `update` of this phase (rows `idx` of the rollout).
  StepInfo minibatch_info(const detail::RolloutData& d, const torch::Tensor& idx, int64_t update) {
    const int64_t per_phase = config_.batches_per_learning_phase * config_.num_minibatches;
    auto mask = d.mask.index_select(0, idx);  // [mb, G]
    return StepInfo{.step = phase_ * per_phase + update,
                    .ids = d.ids.index_select(0, idx),
                    .attention_mask = d.attention_mask.index_select(0, idx),
                    .loss_mask = torch::cat({torch::zeros({mask.size(0), d.p}, mask.options()), mask}, 1),
                    .optimizer = &optimizer_.optimizer()};
  }

  // ---- the reference model: a frozen copy, or the policy's base with adapters disabled ----

  /// Runs `f(reference_base)` without gradients: the frozen copy, or the policy's base inside AdaptersDisabled.
  template <class F>
  auto with_reference(F&& f) {
    torch::NoGradGuard no_grad;
    AutocastScope autocast(config_.precision, policy_->base->device());
    if constexpr (kSharedReference) {
      AdaptersDisabled off(*policy_->base);
      return f(*policy_->base);
    } else {
      return f(*reference_);
    }
  }

  /// Reference final-layernorm outputs [B, G, D] at the G positions predicting the generated tokens (the prompt is
  /// `p` positions long).
  torch::Tensor reference_hidden(const torch::Tensor& ids, const torch::Tensor& mask, int64_t p, int64_t g) {
    return with_reference(
        [&](auto& reference) { return detail::response_hidden(reference, ids, mask, p, g).contiguous(); });
  }

  /// The reference's log-probs [B, G] of `tokens` [B, G] from its final-layernorm outputs `hidden` [B, G, D],
  /// `chunk` rows at a time.
  torch::Tensor reference_logprobs(const torch::Tensor& hidden, const torch::Tensor& tokens, int64_t chunk) {
    return with_reference([&](auto& reference) {
      return detail::chunked_logprobs(reference, hidden, tokens, config_.temperature, chunk);
    });
  }

  /// Reference logits [..., V] of reference hidden states [..., D].
  torch::Tensor reference_logits(const torch::Tensor& hidden) {
    return with_reference([&](auto& reference) { return reference.logits(hidden); });
  }

  std::vector<std::string> decode_completions(const Generation& gen) const {
    std::vector<std::string> out;
    for (const auto& ids : gen.token_ids()) out.push_back(tokenizer_.decode(ids));
    return out;
  }

  /// AdamW over the trainable parameters only: one group per depth of the base model (embeddings, each block, the
  /// final layernorm), learning at base_lr x layer_lr_decay^(n_layer + 1 - depth), and one for the value head at
  /// head_lr. Empty groups (frozen layers) are left out.
  void build_optimizer() {
    optimizer_.add_gpt2(*policy_->base, config_.base_lr, config_.layer_lr_decay)
        .add("value_head", policy_->head_parameters(), config_.head_lr)
        .build("PPOTrainer");
  }

  Policy policy_;
  RewardFn reward_;
  KLCtl kl_;
  PPOConfig config_;
  GPT2Tokenizer tokenizer_;
  Base reference_{nullptr};  // the frozen copy (null when kSharedReference)
  GroupedAdamW optimizer_{config_.weight_decay};
  torch::Generator shuffle_;
  int64_t phase_ = 0;
  std::vector<Callback> callbacks_;
  StepCallbacks step_callbacks_;
};

// ---- names for the common compositions ----

/// GPT-2 with the seed notebook's MLP value head, fully fine-tuned.
using GPT2Policy = ActorCritic<GPT2<>, MLPValueHead>;

/// PPO on GPT-2 with the adaptive KL controller: `rlhf::GPT2PPOTrainer<decltype(reward)> trainer(...)`.
template <class RewardFn>
using GPT2PPOTrainer = PPOTrainer<GPT2Policy, RewardFn, AdaptiveKL>;

}  // namespace rlhf
