#pragma once
/// @file Advantage estimation for PPO on language models: generalized advantage estimation (Schulman et al. 2015,
/// "High-Dimensional Continuous Control Using Generalized Advantage Estimation", arXiv 1506.02438) in TRL's
/// per-token form, and the one-step estimate of the seed notebook.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <rlhf/core/masked.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Advantages and value targets of a batch of responses, both [B, T] and without autograd history.
struct Advantages {
  torch::Tensor advantages;  // [B, T] A_t; 0 at masked-out positions
  torch::Tensor returns;     // [B, T] A_t + V_t, the value head's regression target; 0 at masked-out positions
};

/// Generalized advantage estimation (Schulman et al. 2015, arXiv 1506.02438) over the token positions of a batch:
///
///     delta_t = r_t + gamma * V_{t+1} - V_t
///     A_t     = delta_t + gamma * lambda * A_{t+1}
///     returns = A + V
///
/// `rewards`, `values` and `mask` are [B, T] (mask of any dtype, nonzero = a valid response token). Rows may have
/// uneven lengths: every masked-out position is treated as outside the episode, so
///   - the bootstrap value beyond the last position, and beyond the last valid position of each row, is 0 (the
///     response is finished: V_{T} = 0 and V_{end} = 0), as in TRL's `compute_advantages`;
///   - masked-out positions get A = 0 and returns = 0 and contribute nothing to the valid ones (whatever rewards and
///     values are stored there: padding garbage, NaN included, is ignored);
///   - a masked-out position inside a row ends the recursion like an episode boundary.
/// For the usual masks, where each row's valid positions are one contiguous run (left padding before it, right
/// padding after it), the valid positions equal TRL's loop exactly (TRL multiplies values and rewards by the mask and
/// leaves nonzero advantages at leading masked positions, which its losses then mask out).
///
/// Unlike TRL's PPOTrainer, no whitening happens here: normalise with `masked_whiten(result.advantages, mask)`.
/// Computed in at least float32, vectorised over the batch with one loop over T; the results are detached (they are
/// targets). gamma and lambda must lie in [0, 1]; gamma = 1, lambda = 0 gives the one-step advantage
/// r_t + V_{t+1} - V_t (see one_step_advantages).
inline Advantages gae(const torch::Tensor& rewards, const torch::Tensor& values, const torch::Tensor& mask, double gamma,
                      double lambda) {
  if (!values.defined() || values.dim() != 2)
    detail::fail("gae: values must be [B, T], got {}", detail::ppo_math::shape_of(values));
  detail::ppo_math::check_same_shape("gae", "values", values, "rewards", rewards);
  detail::ppo_math::check_same_shape("gae", "values", values, "mask", mask);
  if (!(gamma >= 0.0 && gamma <= 1.0)) detail::fail("gae: gamma must lie in [0, 1], got {}", gamma);
  if (!(lambda >= 0.0 && lambda <= 1.0)) detail::fail("gae: lambda must lie in [0, 1], got {}", lambda);

  torch::NoGradGuard no_grad;
  const auto dtype = torch::promote_types(torch::promote_types(rewards.scalar_type(), values.scalar_type()),
                                          torch::kFloat);
  auto valid = detail::ppo_math::valid_of(mask);                           // [B, T] bool
  auto r = rewards.to(dtype).masked_fill(valid.logical_not(), 0);          // [B, T]
  auto v = values.to(dtype).masked_fill(valid.logical_not(), 0);           // [B, T]
  auto keep = valid.to(dtype);                                              // [B, T] 1 valid, 0 masked
  const int64_t T = values.size(1);
  if (T == 0) return {torch::zeros_like(v), torch::zeros_like(v)};

  std::vector<torch::Tensor> reversed;  // A_t for t = T-1 .. 0, each [B]
  reversed.reserve(static_cast<size_t>(T));
  auto next_value = torch::zeros({values.size(0)}, v.options());  // [B] V_{t+1}, 0 beyond the end
  auto next_advantage = torch::zeros_like(next_value);            // [B] A_{t+1}, 0 beyond the end
  for (int64_t t = T - 1; t >= 0; --t) {
    auto v_t = v.select(1, t);
    auto delta = r.select(1, t) + gamma * next_value - v_t;                         // [B]
    auto a_t = (delta + (gamma * lambda) * next_advantage) * keep.select(1, t);     // [B], 0 when masked
    reversed.push_back(a_t);
    next_value = v_t;  // already 0 where masked: a masked position bootstraps nothing
    next_advantage = a_t;
  }
  std::reverse(reversed.begin(), reversed.end());
  auto advantages = torch::stack(reversed, 1);  // [B, T]
  return {advantages, advantages + v};
}

/// The seed notebook's one-step advantage estimate (`compute_advantages(values, rewards, prefix_len)`), for a batch
/// of sequences of equal length S = prefix_len + G whose only reward is one score per sequence at its end:
///
///     A_t = V_{t+1} - V_t   for the first G - 1 generated positions,  A_{G-1} = r - V_{G-1}  for the last,
///
/// where `values` is [B, S], the value head at every position of prompt + response, V_t = values[:, prefix_len - 1
/// + t] (the value of the state that predicts generated token t), and `rewards` is [B]. Returns [B, G].
///
/// Conventions: this is gae(gamma = 1, lambda = 0) with per-token rewards that are 0 except the score at the last
/// position and values = values[:, prefix_len - 1 : -1], with no mask (every row has all G tokens); a per-token reward
/// (a KL penalty) or rows of uneven length need gae(). The notebook writes `values[prefix_len-1:-1]`, slicing the
/// batch dimension by mistake; this is the intended `values[:, prefix_len-1:-1]`. Detached, in values' dtype.
inline torch::Tensor one_step_advantages(const torch::Tensor& values, const torch::Tensor& rewards,
                                         int64_t prefix_len) {
  if (!values.defined() || values.dim() != 2)
    detail::fail("one_step_advantages: values must be [B, S], got {}", detail::ppo_math::shape_of(values));
  if (!rewards.defined() || rewards.dim() != 1 || rewards.size(0) != values.size(0))
    detail::fail("one_step_advantages: rewards must be [B] = [{}], got {}", values.size(0),
                 detail::ppo_math::shape_of(rewards));
  const int64_t S = values.size(1);
  if (prefix_len < 1 || prefix_len >= S)
    detail::fail("one_step_advantages: prefix_len must lie in [1, {}) for sequences of length {}, got {}", S, S,
                 prefix_len);
  torch::NoGradGuard no_grad;
  const int64_t G = S - prefix_len;
  auto one_step = torch::cat({values.narrow(1, prefix_len, G - 1), rewards.to(values.scalar_type()).unsqueeze(1)},
                             1);                                    // [B, G] V_{t+1}, and r at the end
  auto zero_step = values.narrow(1, prefix_len - 1, G);            // [B, G] V_t
  return one_step - zero_step;
}

}  // namespace rlhf
