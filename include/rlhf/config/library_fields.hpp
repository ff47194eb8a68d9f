#pragma once
/// @file Config-file field lists (visit_fields) and enum names (enum_names) of the library's option structs:
/// PPOConfig with its FreezeOptions, LoRAOptions, SamplingConfig, and the enums Precision, KLPlacement, KLEstimator,
/// KLControl.
/// With these, rlhf::config::bind_config() reads them strictly from TOML / JSON config files, to_json_config() writes
/// them, and describe_fields() documents them. The keys are the C++ field names. Every field of each struct is
/// listed (tests/config_test.cpp checks the lists against the struct definitions).

#include <array>
#include <string_view>
#include <utility>

#include <rlhf/adapters/freeze.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/config/config_file.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/generation/sampling.hpp>
#include <rlhf/ppo/config.hpp>
#include <rlhf/ppo/kl.hpp>

namespace rlhf {

// ---- enums ----

/// Names of Precision in config files: "fp32", "bf16" and "auto" (what to_string(Precision) writes), and the
/// aliases "float32" and "bfloat16" that parse_precision() also accepts.
constexpr auto enum_names(Precision) {
  using Name = std::pair<std::string_view, Precision>;
  return std::array{Name{"fp32", Precision::fp32}, Name{"bf16", Precision::bf16}, Name{"auto", Precision::automatic},
                    Name{"float32", Precision::fp32}, Name{"bfloat16", Precision::bf16}};
}

/// Names of KLPlacement in config files: "reward" and "loss".
constexpr auto enum_names(KLPlacement) {
  using Name = std::pair<std::string_view, KLPlacement>;
  return std::array{Name{"reward", KLPlacement::reward}, Name{"loss", KLPlacement::loss}};
}

/// Names of KLEstimator in config files: "k1", "k2" and "k3".
constexpr auto enum_names(KLEstimator) {
  using Name = std::pair<std::string_view, KLEstimator>;
  return std::array{Name{"k1", KLEstimator::k1}, Name{"k2", KLEstimator::k2}, Name{"k3", KLEstimator::k3}};
}

/// Names of KLControl in config files: "fixed" and "adaptive".
constexpr auto enum_names(KLControl) {
  using Name = std::pair<std::string_view, KLControl>;
  return std::array{Name{"fixed", KLControl::fixed}, Name{"adaptive", KLControl::adaptive}};
}

// ---- structs ----

/// Fields of FreezeOptions: embeddings, first_blocks.
template <class V>
void visit_fields(FreezeOptions& c, V&& v) {
  v("embeddings", c.embeddings, "freeze wte and wpe (wte is tied to the output projection, so that freezes it too)");
  v("first_blocks", c.first_blocks, "freeze blocks 0 .. first_blocks - 1, e.g. 6 of gpt2's 12");
}

/// Fields of PPOConfig, in the order of its definition; `freeze` is the nested table of FreezeOptions.
template <class V>
void visit_fields(PPOConfig& c, V&& v) {
  v("seed", c.seed, "seeds sampling and minibatch shuffling");
  v("total_phases", c.total_phases, "rollout + learning phases of the run (for the LR schedule)");
  v("batch_size", c.batch_size, "samples per phase");
  v("num_minibatches", c.num_minibatches, "minibatches per epoch; must divide batch_size");
  v("batches_per_learning_phase", c.batches_per_learning_phase, "epochs over each phase's samples");
  v("base_lr", c.base_lr, "learning rate of the base model");
  v("head_lr", c.head_lr, "learning rate of the value head");
  v("weight_decay", c.weight_decay, "AdamW weight decay");
  v("max_grad_norm", c.max_grad_norm, "global gradient-norm clip; 0 = off");
  v("warmup_steps", c.warmup_steps, "phases of linear warmup; must be < total_phases");
  v("final_scale", c.final_scale, "LR multiplier reached by linear decay at the last phase");
  v("clip_coef", c.clip_coef, "PPO ratio clip epsilon");
  v("vf_coef", c.vf_coef, "value-loss weight");
  v("ent_coef", c.ent_coef, "entropy-bonus weight");
  v("gen_len", c.gen_len, "new tokens per sample");
  v("temperature", c.temperature, "sampling temperature; log-probs use the same scaling");
  v("top_k", c.top_k, "sampling top-k; 0 = off");
  v("top_p", c.top_p, "sampling nucleus; 1 = off");
  v("stop_at_eos", c.stop_at_eos, "end samples at EOS");
  v("prefix", c.prefix, "prompt used when no prompts are given");
  v("prepend_bos", c.prepend_bos, "start every prompt with BOS (<|endoftext|>)");
  v("kl_coef", c.kl_coef, "initial KL coefficient of the KL controller");
  v("normalize_reward", c.normalize_reward, "standardise scores per phase: (r - mean) / (std + 1e-5)");
  v("reward_scale", c.reward_scale, "multiply scores (after normalisation)");
  v("reward_clip", c.reward_clip, "clip scores to [-c, c] (after scaling); unset = off");
  v("gamma", c.gamma, "discount");
  v("lambda", c.lambda, "GAE lambda; 0 with gamma 1 = one-step advantages");
  v("whiten_advantages", c.whiten_advantages, "standardise advantages over the phase (masked)");
  v("clip_value", c.clip_value, "clip new values to old +- c in the value loss; unset = off");
  v("kl_placement", c.kl_placement, "where the KL penalty goes: per-token in the reward, or full KL in the loss");
  v("kl_estimator", c.kl_estimator, "per-token KL estimator (reward placement and statistics)");
  v("target_kl", c.target_kl, "stop the phase's epochs once approx KL exceeds 1.5 x this; unset = off");
  v("train_dropout", c.train_dropout, "keep dropout on in learning forwards (always off in rollouts)");
  v("precision", c.precision, "bf16: forwards under bf16 autocast (fp32 weights, optimiser, losses); auto: bf16 "
                              "where the device computes bf16 products natively, else fp32");
  v("reference_bf16", c.reference_bf16, "store the frozen reference copy in bf16 (full fine-tuning only)");
  v("recompute_old_logprobs", c.recompute_old_logprobs,
    "a second policy forward after sampling for old log-probs and values; false = the sampling's own");
  v("freeze", c.freeze, "parts of the base model kept frozen");
  v("layer_lr_decay", c.layer_lr_decay,
    "block i learns at base_lr x decay^(n_layer - i), embeddings at base_lr x decay^(n_layer + 1); 1 = off");
}

/// Fields of LoRAOptions: alpha, dropout.
template <class V>
void visit_fields(LoRAOptions& c, V&& v) {
  v("alpha", c.alpha, "the update is scaled by alpha / rank, e.g. 16 with rank 8 gives 2");
  v("dropout", c.dropout, "dropout on the adapter's input, in training mode only, e.g. 0.05");
}

/// Fields of SamplingConfig, in the order of its definition.
template <class V>
void visit_fields(SamplingConfig& c, V&& v) {
  v("max_new_tokens", c.max_new_tokens, "tokens to generate per row");
  v("temperature", c.temperature, "logits are divided by this; 0 = greedy (argmax)");
  v("top_k", c.top_k, "sample among the k most likely tokens; 0 = no limit");
  v("top_p", c.top_p, "nucleus: smallest set of tokens whose probability reaches p; 1 = off");
  v("stop_at_eos", c.stop_at_eos, "end a row at EOS (later positions are padding)");
  v("eos_id", c.eos_id, "EOS token id; required when stop_at_eos");
  v("pad_id", c.pad_id, "token written after EOS when stop_at_eos");
  v("seed", c.seed, "seed of the random draws: same seed, same samples");
}

}  // namespace rlhf
