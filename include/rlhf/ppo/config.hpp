#pragma once
/// @file PPOConfig: every runtime knob of a PPO run, with the seed notebook's defaults (its RLHFArgs).

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include <rlhf/adapters/freeze.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/ppo/kl.hpp>
#include <rlhf/train/optimizer.hpp>

namespace rlhf {

/// Where the KL penalty against the reference model enters the objective.
enum class KLPlacement {
  reward,  ///< per-token penalty -kl_coef * KL_t added to the rewards (Ziegler et al. 2019, TRL)
  loss,    ///< full-vocabulary KL(pi || pi_ref) over the generated positions, kl_coef times it added to the loss
           ///< (the seed notebook)
};

/// Hyperparameters of PPOTrainer. Defaults are the seed notebook's RLHFArgs; the additions default to what
/// reproduces it (gamma = 1, lambda = 0: one-step advantages; KL in the loss over the full vocabulary).
struct PPOConfig {
  uint64_t seed = 1;                      ///< seeds sampling and minibatch shuffling
  int64_t total_phases = 200;             ///< rollout + learning phases of the run (for the LR schedule)
  int64_t batch_size = 32;                ///< samples per phase
  int64_t num_minibatches = 4;            ///< minibatches per epoch; must divide batch_size
  int64_t batches_per_learning_phase = 2; ///< epochs over each phase's samples
  double base_lr = 2e-5;                  ///< learning rate of the base model
  double head_lr = 5e-4;                  ///< learning rate of the value head
  double weight_decay = 0.01;             ///< AdamW weight decay (torch's default)
  double max_grad_norm = 1.0;             ///< global gradient-norm clip; 0 = off
  int64_t warmup_steps = 20;              ///< phases of linear warmup; must be < total_phases
  double final_scale = 0.1;               ///< LR multiplier reached by linear decay at the last phase
  double clip_coef = 0.2;                 ///< PPO ratio clip epsilon
  double vf_coef = 0.15;                  ///< value-loss weight
  double ent_coef = 0.001;                ///< entropy-bonus weight
  int64_t gen_len = 50;                   ///< new tokens per sample
  double temperature = 1.0;               ///< sampling temperature; log-probs use the same scaling
  int64_t top_k = 10;                     ///< sampling top-k; 0 = off
  double top_p = 1.0;                     ///< sampling nucleus; 1 = off
  bool stop_at_eos = false;               ///< end samples at EOS (the seed does not)
  std::string prefix = "This is";         ///< prompt used by step() without prompts
  bool prepend_bos = true;                ///< start every prompt with BOS (<|endoftext|>)
  double kl_coef = 2.5;                   ///< initial KL coefficient of the KL controller
  bool normalize_reward = true;           ///< standardise scores per phase: (r - mean) / (std + 1e-5)
  double reward_scale = 1.0;              ///< multiply scores (after normalisation)
  std::optional<double> reward_clip;      ///< clip scores to [-c, c] (after scaling)
  double gamma = 1.0;                     ///< discount
  double lambda = 0.0;                    ///< GAE lambda; 0 with gamma 1 = the seed's one-step advantages
  bool whiten_advantages = true;          ///< standardise advantages over the phase (masked)
  std::optional<double> clip_value;       ///< clip new values to old +- c in the value loss; unset = off
  KLPlacement kl_placement = KLPlacement::loss;  ///< where the KL penalty goes
  KLEstimator kl_estimator = KLEstimator::k1;    ///< per-token estimator (reward placement and statistics)
  std::optional<double> target_kl;        ///< stop the phase's epochs once approx KL exceeds 1.5 x this
  bool train_dropout = false;             ///< keep dropout on in learning forwards (off in rollouts always)
  Precision precision = Precision::automatic;  ///< bf16: forwards under bf16 autocast (fp32 weights, optimiser,
                                              ///< losses); auto: bf16 where the device computes bf16 natively
  bool reference_bf16 = false;            ///< store the frozen reference copy in bf16 (half its memory; full
                                          ///< fine-tuning only: an adapter policy has no copy)
  bool recompute_old_logprobs = false;    ///< run a second no-grad forward of the policy after sampling for the
                                          ///< old log-probs and values (the seed notebook, TRL); false takes them
                                          ///< from the sampling's own forward passes: the same weights and
                                          ///< positions, equal up to floating-point rounding, one forward fewer
  FreezeOptions freeze;                   ///< embeddings / first blocks of the base model kept frozen
  double layer_lr_decay = 1.0;            ///< block i learns at base_lr x decay^(n_layer - i), embeddings at
                                          ///< base_lr x decay^(n_layer + 1); 1 = one rate for the whole base

  /// Minibatch size (batch_size / num_minibatches).
  int64_t minibatch_size() const { return batch_size / num_minibatches; }

  /// Throws rlhf::Error naming the field when a value is out of range or inconsistent.
  void validate() const {
    auto positive = [](int64_t v, const char* name) {
      if (v <= 0) detail::fail("PPOConfig: {} must be positive, got {}", name, v);
    };
    positive(total_phases, "total_phases");
    positive(batch_size, "batch_size");
    positive(num_minibatches, "num_minibatches");
    positive(batches_per_learning_phase, "batches_per_learning_phase");
    positive(gen_len, "gen_len");
    if (batch_size % num_minibatches != 0)
      detail::fail("PPOConfig: batch_size ({}) must be divisible by num_minibatches ({})", batch_size,
                   num_minibatches);
    if (warmup_steps < 0 || warmup_steps >= total_phases)
      detail::fail("PPOConfig: warmup_steps ({}) must be in [0, total_phases = {})", warmup_steps, total_phases);
    if (!(base_lr >= 0) || !(head_lr >= 0)) detail::fail("PPOConfig: learning rates must be >= 0");
    if (!(final_scale >= 0 && final_scale <= 1))
      detail::fail("PPOConfig: final_scale must be in [0, 1], got {}", final_scale);
    if (!(clip_coef > 0)) detail::fail("PPOConfig: clip_coef must be positive, got {}", clip_coef);
    if (!(max_grad_norm >= 0)) detail::fail("PPOConfig: max_grad_norm must be >= 0, got {}", max_grad_norm);
    if (!(temperature > 0)) detail::fail("PPOConfig: temperature must be positive, got {}", temperature);
    if (top_k < 0) detail::fail("PPOConfig: top_k must be >= 0, got {}", top_k);
    if (!(top_p > 0 && top_p <= 1)) detail::fail("PPOConfig: top_p must be in (0, 1], got {}", top_p);
    if (!(kl_coef >= 0)) detail::fail("PPOConfig: kl_coef must be >= 0, got {}", kl_coef);
    if (!(gamma >= 0 && gamma <= 1)) detail::fail("PPOConfig: gamma must be in [0, 1], got {}", gamma);
    if (!(lambda >= 0 && lambda <= 1)) detail::fail("PPOConfig: lambda must be in [0, 1], got {}", lambda);
    if (reward_clip && !(*reward_clip > 0))
      detail::fail("PPOConfig: reward_clip must be positive, got {}", *reward_clip);
    if (clip_value && !(*clip_value > 0))
      detail::fail("PPOConfig: clip_value must be positive, got {}", *clip_value);
    if (target_kl && !(*target_kl > 0)) detail::fail("PPOConfig: target_kl must be positive, got {}", *target_kl);
    if (!(layer_lr_decay > 0 && layer_lr_decay <= 1))
      detail::fail("PPOConfig: layer_lr_decay must be in (0, 1], got {}", layer_lr_decay);
  }

  /// LR multiplier at `phase` (0-based): linear warmup over warmup_steps, then linear decay to final_scale at the
  /// last phase (WarmupDecay).
  double lr_scale(int64_t phase) const { return WarmupDecay{warmup_steps, total_phases, final_scale}(phase); }
};

}  // namespace rlhf
