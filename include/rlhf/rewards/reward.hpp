#pragma once
/// @file Rewards: what a PPO rollout is scored by. The Reward concept, FunctionReward over texts or token ids.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// One batch of sampled continuations, as a reward sees it.
struct Rollout {
  torch::Tensor ids;             ///< [B, P + G] int64: left-padded prompts followed by the samples
  torch::Tensor attention_mask;  ///< [B, P + G] int64: 1 = real token
  torch::Tensor generated_mask;  ///< [B, G] int64: 1 = generated token (up to and including EOS)
  int64_t prompt_length = 0;     ///< P
  std::vector<std::string> prompts;      ///< decoded prompts (without padding)
  std::vector<std::string> completions;  ///< decoded continuations (without padding)

  /// Rows in the batch.
  int64_t size() const { return ids.size(0); }
  /// The generated tokens [B, G].
  torch::Tensor new_tokens() const { return ids.narrow(1, prompt_length, ids.size(1) - prompt_length); }
};

/// A reward: scores a rollout, one fp32 score per row ([B]). `R` may keep state (a learned model, a counter).
template <class R>
concept Reward = requires(R reward, const Rollout& rollout) {
  { reward(rollout) } -> std::convertible_to<torch::Tensor>;
};

/// Checks that `scores` is [B] and finite, returning it as fp32 on the CPU; the error names the first bad sample.
inline torch::Tensor check_scores(const torch::Tensor& scores, int64_t batch) {
  if (!scores.defined() || scores.dim() != 1 || scores.size(0) != batch)
    detail::fail("reward: expected one score per sample, shape [{}], got {}", batch,
                 scores.defined() ? detail::format_shape(scores.sizes()) : "an undefined tensor");
  auto cpu = scores.detach().to(torch::kCPU, torch::kDouble).contiguous();
  const double* data = cpu.data_ptr<double>();
  for (int64_t i = 0; i < batch; ++i)
    if (!std::isfinite(data[i]))
      detail::fail("reward: sample {} has score {} (scores must be finite; ---> HINT: check the reward function "
                   "for divisions by zero or log(0))",
                   i, data[i]);
  return cpu.to(torch::kFloat);
}

/// A reward from any callable. The callable takes one of:
/// - `const std::string& completion` -> number (scored one sample at a time),
/// - `const std::vector<std::string>& completions` -> std::vector<double> or a [B] tensor,
/// - `const Rollout&` -> std::vector<double> or a [B] tensor (token ids, masks, prompts: everything).
/// Scores are checked (one per sample, finite) and returned as a [B] fp32 tensor.
template <class F>
class FunctionReward {
 public:
  explicit FunctionReward(F function) : function_(std::move(function)) {}

  torch::Tensor operator()(const Rollout& rollout) {
    const int64_t batch = rollout.size();
    if constexpr (std::is_invocable_v<F&, const Rollout&>) {
      return check_scores(to_tensor(function_(rollout)), batch);
    } else if constexpr (std::is_invocable_v<F&, const std::vector<std::string>&>) {
      return check_scores(to_tensor(function_(rollout.completions)), batch);
    } else {
      static_assert(std::is_invocable_v<F&, const std::string&>,
                    "FunctionReward: the callable must take a completion (const std::string&), all completions "
                    "(const std::vector<std::string>&) or the rollout (const rlhf::Rollout&)");
      std::vector<double> scores;
      scores.reserve(rollout.completions.size());
      for (const auto& text : rollout.completions) scores.push_back(static_cast<double>(function_(text)));
      return check_scores(to_tensor(scores), batch);
    }
  }

 private:
  static torch::Tensor to_tensor(const torch::Tensor& t) { return t; }
  template <class T>
  static torch::Tensor to_tensor(const std::vector<T>& values) {
    std::vector<double> v(values.begin(), values.end());
    return torch::tensor(v, torch::kDouble);
  }

  F function_;
};

}  // namespace rlhf
