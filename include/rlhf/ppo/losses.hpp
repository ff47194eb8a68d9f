#pragma once
/// @file The PPO losses over the tokens of a batch of responses (Schulman et al. 2017, "Proximal Policy Optimization
/// Algorithms", arXiv 1707.06347), with the conventions of TRL's PPOTrainer.loss, so that both give the same numbers
/// on the same inputs: clipped surrogate, clipped value loss, entropy bonus and explained variance.

#include <limits>
#include <optional>

#include <torch/torch.h>

#include <rlhf/core/masked.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

/// The clipped surrogate loss and its diagnostics, 0-dim tensors.
struct PolicyLossOutput {
  torch::Tensor loss;           // to minimise; carries the gradient with respect to the log-probabilities
  torch::Tensor clip_fraction;  // share of valid tokens where the clipped term was the active one (detached)
  torch::Tensor approx_kl;      // 0.5 * mean (logp - old_logp)^2, an estimate of KL(old || new) (detached)
};

/// PPO's clipped surrogate objective as a loss (Schulman et al. 2017, arXiv 1707.06347, eq. 7), over the valid tokens:
///
///     ratio = exp(logp - old_logp)
///     loss  = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))
///     clip_fraction = masked_mean(-A * clamp(ratio, ...) > -A * ratio),  approx_kl = 0.5 * masked_mean((logp - old)^2)
///
/// `logprobs` (the current policy's, with gradient), `old_logprobs` (at sampling time), `advantages` and `mask` are
/// [B, T]; old_logprobs and advantages are treated as constants (detached). Exactly TRL's `pg_loss`, `pg_clipfrac`
/// and `approxkl`; whiten the advantages beforehand as TRL does (masked_whiten). Throws when the shapes differ or
/// clip_coef is negative.
inline PolicyLossOutput clipped_surrogate(const torch::Tensor& logprobs, const torch::Tensor& old_logprobs,
                                          const torch::Tensor& advantages, const torch::Tensor& mask,
                                          double clip_coef) {
  detail::ppo_math::check_same_shape("clipped_surrogate", "logprobs", logprobs, "old_logprobs", old_logprobs);
  detail::ppo_math::check_same_shape("clipped_surrogate", "logprobs", logprobs, "advantages", advantages);
  detail::ppo_math::check_same_shape("clipped_surrogate", "logprobs", logprobs, "mask", mask);
  if (!(clip_coef >= 0.0)) detail::fail("clipped_surrogate: clip_coef must be non-negative, got {}", clip_coef);
  auto old = old_logprobs.detach();
  auto adv = advantages.detach();
  auto log_ratio = logprobs - old;                                                // [B, T]
  auto ratio = torch::exp(log_ratio);                                             // [B, T]
  auto pg_losses = -adv * ratio;                                                  // [B, T]
  auto pg_losses2 = -adv * torch::clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef);  // [B, T]
  PolicyLossOutput out;
  out.loss = masked_mean(torch::max(pg_losses, pg_losses2), mask);
  torch::NoGradGuard no_grad;
  out.clip_fraction = masked_mean(pg_losses2.gt(pg_losses), mask);
  out.approx_kl = 0.5 * masked_mean(log_ratio * log_ratio, mask);
  return out;
}

/// The value loss and its diagnostic, 0-dim tensors.
struct ValueLossOutput {
  torch::Tensor loss;           // to minimise (before the value coefficient); carries the gradient to the values
  torch::Tensor clip_fraction;  // share of valid tokens where the clipped prediction was the active one (detached)
};

/// The value-head regression loss of PPO over the valid tokens, with optional clipping of the prediction to a
/// trust region around the values at sampling time (PPO's value clipping, as in the baselines code and TRL):
///
///     clipped:    v_clip = clamp(v, old - c, old + c) = old + clamp(v - old, -c, c)
///                 loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)),
///                 clip_fraction = masked_mean((v_clip - R)^2 > (v - R)^2)
///     unclipped:  loss = 0.5 * masked_mean((v - R)^2), clip_fraction = 0
///
/// `values` (current prediction, with gradient), `old_values`, `returns` (the targets, e.g. gae().returns) and `mask`
/// are [B, T]; old_values and returns are treated as constants. With clipping this is exactly TRL's `vf_loss` and
/// `vf_clipfrac` (TRL's clip_by_value is the clamp above); without, it is the seed notebook's `calc_value_fn_loss`
/// before vf_coef, restricted to the mask. Throws when the shapes differ or clip_range_value is negative.
inline ValueLossOutput value_loss(const torch::Tensor& values, const torch::Tensor& old_values,
                                  const torch::Tensor& returns, const torch::Tensor& mask,
                                  std::optional<double> clip_range_value) {
  detail::ppo_math::check_same_shape("value_loss", "values", values, "old_values", old_values);
  detail::ppo_math::check_same_shape("value_loss", "values", values, "returns", returns);
  detail::ppo_math::check_same_shape("value_loss", "values", values, "mask", mask);
  if (clip_range_value && !(*clip_range_value >= 0.0))
    detail::fail("value_loss: clip_range_value must be non-negative, got {}", *clip_range_value);
  auto ret = returns.detach();
  auto err = values - ret;
  auto losses1 = err * err;  // [B, T]
  ValueLossOutput out;
  if (!clip_range_value) {
    out.loss = 0.5 * masked_mean(losses1, mask);
    out.clip_fraction = torch::zeros({}, out.loss.options()).detach();
    return out;
  }
  auto old = old_values.detach();
  const double c = *clip_range_value;
  auto clipped = torch::max(torch::min(values, old + c), old - c);  // [B, T]
  auto err2 = clipped - ret;
  auto losses2 = err2 * err2;  // [B, T]
  out.loss = 0.5 * masked_mean(torch::max(losses1, losses2), mask);
  torch::NoGradGuard no_grad;
  out.clip_fraction = masked_mean(losses2.gt(losses1), mask);
  return out;
}

/// The mean entropy of the policy over the valid tokens, masked_mean(entropy, mask), from per-token entropies [B, T]
/// (entropy_from_logits or token_stats_chunked). Keeps the gradient. TRL's logged `policy/entropy`.
inline torch::Tensor mean_entropy(const torch::Tensor& entropy, const torch::Tensor& mask) {
  return masked_mean(entropy, mask);
}

/// The entropy bonus ent_coef * masked_mean(entropy, mask), to subtract from the loss (or add to the objective) so
/// that the policy keeps exploring, as the seed notebook's `calc_entropy_bonus` (which averages over every token, with
/// ent_coef 0.001) and PPO's c2 * S term (Schulman et al. 2017, arXiv 1707.06347, eq. 9).
inline torch::Tensor entropy_bonus(const torch::Tensor& entropy, const torch::Tensor& mask, double ent_coef) {
  return ent_coef * masked_mean(entropy, mask);
}

/// How much of the variance of the returns the value head explains over the valid tokens:
/// 1 - var(R - V) / var(R) (1 is perfect, 0 is a constant prediction, negative is worse than a constant). NaN when
/// the returns are constant over the mask, as in CleanRL / stable-baselines. Detached, a 0-dim tensor.
inline torch::Tensor explained_variance(const torch::Tensor& values, const torch::Tensor& returns,
                                        const torch::Tensor& mask) {
  detail::ppo_math::check_same_shape("explained_variance", "values", values, "returns", returns);
  detail::ppo_math::check_same_shape("explained_variance", "values", values, "mask", mask);
  torch::NoGradGuard no_grad;
  // The Bessel correction cancels in the ratio: biased variances also work for a single valid token.
  auto var_returns = masked_var(returns, mask, /*unbiased=*/false);
  auto var_residual = masked_var(returns - values, mask, /*unbiased=*/false);
  auto ev = 1.0 - var_residual / var_returns;
  return torch::where(var_returns.eq(0), torch::full_like(ev, std::numeric_limits<double>::quiet_NaN()), ev);
}

}  // namespace rlhf
