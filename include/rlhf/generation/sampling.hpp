#pragma once
/// @file Batched sampling with a KV cache: temperature, top-k, top-p, EOS handling, a seed per call.

#include <cstdint>
#include <functional>
#include <limits>
#include <optional>

#include <vector>

#include <torch/torch.h>

#include <rlhf/core/small_matmul.hpp>
#include <rlhf/core/softmax_stats.hpp>
#include <rlhf/core/top_k.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/model/kv_cache.hpp>

namespace rlhf {

/// How to sample continuations. Defaults follow the seed notebook (temperature 1, top-k 10, 50 new tokens).
struct SamplingConfig {
  int64_t max_new_tokens = 50;   ///< tokens to generate per row, e.g. 50
  double temperature = 1.0;      ///< logits are divided by this; 0 means greedy (argmax), e.g. 1.0
  int64_t top_k = 10;            ///< sample among the k most likely tokens; 0 = no limit, e.g. 10
  double top_p = 1.0;            ///< nucleus: smallest set of tokens whose probability reaches p; 1 = off
  bool stop_at_eos = false;      ///< end a row at EOS (later positions are padding, masked out); the seed does not
  std::optional<int64_t> eos_id; ///< EOS token id; required when stop_at_eos
  int64_t pad_id = 0;            ///< token written after EOS when stop_at_eos
  uint64_t seed = 0;             ///< seed of this call's random draws: same seed, same samples

  /// Throws rlhf::Error naming the field when a value is out of range.
  void validate() const {
    if (max_new_tokens < 1) detail::fail("SamplingConfig: max_new_tokens must be >= 1, got {}", max_new_tokens);
    if (!(temperature >= 0)) detail::fail("SamplingConfig: temperature must be >= 0, got {}", temperature);
    if (top_k < 0) detail::fail("SamplingConfig: top_k must be >= 0 (0 = off), got {}", top_k);
    if (!(top_p > 0 && top_p <= 1)) detail::fail("SamplingConfig: top_p must be in (0, 1], got {}", top_p);
    if (stop_at_eos && !eos_id) detail::fail("SamplingConfig: stop_at_eos needs eos_id");
  }
};

/// Result of generate(). G = max_new_tokens, P = prompt length (after left padding).
struct Generation {
  torch::Tensor ids;             ///< [B, P + G] int64: the left-padded prompts followed by the samples
  torch::Tensor attention_mask;  ///< [B, P + G] int64: 1 for real prompt tokens and generated tokens up to EOS
  torch::Tensor logprobs;        ///< [B, G] fp32: log-prob of each sampled token under softmax(logits / T) over the
                                 ///< whole vocabulary (what PPO's ratio uses); under T = 1 when greedy
  torch::Tensor sampling_logprobs;  ///< [B, G] fp32: log-prob under the truncated (top-k / top-p) distribution
                                    ///< actually sampled from (0 when greedy)
  torch::Tensor generated_mask;  ///< [B, G] int64: 1 up to and including EOS (all ones unless stop_at_eos)
  int64_t prompt_length = 0;     ///< P

  /// The generated tokens [B, G].
  torch::Tensor new_tokens() const { return ids.narrow(1, prompt_length, ids.size(1) - prompt_length); }

  /// Each row's generated ids up to and including EOS (where generated_mask is 1), on the CPU, for decoding.
  std::vector<std::vector<int64_t>> token_ids() const {
    auto tokens = new_tokens().to(torch::kCPU).contiguous();  // [B, G]
    auto mask = generated_mask.to(torch::kCPU, torch::kLong).contiguous();  // [B, G]
    const auto t = tokens.accessor<int64_t, 2>();
    const auto m = mask.accessor<int64_t, 2>();
    std::vector<std::vector<int64_t>> out(static_cast<size_t>(tokens.size(0)));
    for (int64_t row = 0; row < tokens.size(0); ++row)
      for (int64_t j = 0; j < tokens.size(1); ++j)
        if (m[row][j]) out[row].push_back(t[row][j]);
    return out;
  }
};

namespace detail {

/// Draws one token per row from `scaled` logits [B, V] (already divided by the temperature) restricted to the
/// top-k / top-p set, using inverse-CDF sampling on the uniforms `u` [B] in [0, 1) (far faster than multinomial
/// on large vocabularies). Returns {token [B], log-prob under the truncated distribution [B]}.
inline std::pair<torch::Tensor, torch::Tensor> draw_token(const torch::Tensor& scaled, const torch::Tensor& u,
                                                          int64_t top_k, double top_p) {
  const int64_t vocab = scaled.size(-1);
  torch::Tensor values, indices;  // candidates [B, K], sorted descending when truncating
  if (top_k > 0 && top_k < vocab) {
    if (auto top = top_k_rows(scaled, top_k))  // core/top_k.hpp: one pass per row
      std::tie(values, indices) = *top;
    else
      std::tie(values, indices) = scaled.topk(top_k, -1, /*largest=*/true, /*sorted=*/true);
  } else if (top_p < 1.0) {
    std::tie(values, indices) = scaled.sort(-1, /*descending=*/true);
  } else {
    values = scaled;
  }
  auto probs = torch::softmax(values, -1);  // [B, K]
  if (top_p < 1.0) {
    // Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    auto before = probs.cumsum(-1) - probs;
    probs = probs.masked_fill(before.ge(top_p), 0.0);
  }
  auto cdf = probs.cumsum(-1);                      // [B, K], unnormalised after top-p
  auto total = cdf.narrow(-1, cdf.size(-1) - 1, 1); // [B, 1]
  auto target = (u.unsqueeze(-1) * total).minimum(total * (1.0 - 1e-6));
  auto choice = torch::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).clamp_max_(cdf.size(-1) - 1);
  auto chosen_prob = probs.gather(-1, choice) / total;  // [B, 1]
  auto token = indices.defined() ? indices.gather(-1, choice) : choice;
  return {token.squeeze(-1), chosen_prob.log().squeeze(-1)};
}

/// log softmax(`logits` [B, V] / `temperature`) at `token` [B]: the softmax-statistics kernels' one pass per row
/// where they apply (a logsumexp composed of torch's operators takes ~5 passes over [B, V]: ~2 ms of a 25 ms
/// decoding step at batch 32 on GPT-2 small), else torch's operators.
inline torch::Tensor token_logprobs(const torch::Tensor& logits, const torch::Tensor& token, double temperature) {
  if (softmax_stats_kernels_apply(logits, {}) && logits.dim() == 2)
    return softmax_stats_forward(logits, token, {}, temperature).logprob;
  auto scaled = temperature == 1.0 ? logits : logits / temperature;
  return scaled.gather(-1, token.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1);
}

}  // namespace detail

/// Sees the final-layernorm outputs [B, D] that predict decoding step `step`'s tokens (position P - 1 + step of
/// every row), under the sampling's inference mode and autocast; e.g. PPOTrainer runs its value head on them.
using StepHiddenObserver = std::function<void(int64_t step, const torch::Tensor& hidden)>;

/// Samples `config.max_new_tokens` tokens after each prompt with a KV cache, under inference mode and with dropout
/// off (the model's training flag is restored afterwards).
/// `prompt_ids` [B, P] left-padded, `prompt_mask` [B, P] (1 = real token; undefined = no padding).
/// `Model` provides `forward(ids, mask, KVCache*) -> hidden [B, T, D]`, `logits(hidden) -> [..., V]`,
/// `new_cache(batch, capacity)` and `config().n_positions` (GPT2Impl does). `on_hidden`, when set, is called once
/// per decoding step before its tokens are drawn (not for steps skipped after every row ended at EOS).
template <class Model>
Generation generate(Model& model, const torch::Tensor& prompt_ids, torch::Tensor prompt_mask,
                    const SamplingConfig& config, const StepHiddenObserver& on_hidden = {}) {
  config.validate();
  if (prompt_ids.dim() != 2 || prompt_ids.size(0) == 0 || prompt_ids.size(1) == 0)
    detail::fail("generate: prompt_ids must be a non-empty [batch, seq] tensor");
  const int64_t b = prompt_ids.size(0), p = prompt_ids.size(1), g = config.max_new_tokens;
  if (p + g > model.config().n_positions)
    detail::fail("generate: prompt length {} + max_new_tokens {} exceeds the model's n_positions = {}", p, g,
                 model.config().n_positions);
  if (config.eos_id && (*config.eos_id < 0 || *config.eos_id >= model.config().vocab_size))
    detail::fail("generate: eos_id {} is not a token id of the model (vocab_size {})", *config.eos_id,
                 model.config().vocab_size);
  const bool was_training = model.is_training();
  model.eval();
  c10::InferenceMode inference;
  // bf16 products (autocast or bf16 weights) on the AVX512-BF16 kernels: each weight packed once per call, or once
  // for as long as the caller keeps a DecodePackScope open (a weight changed in place is packed again)
  std::optional<DecodePackScope> packs;
  if (!DecodePackScope::active()) packs.emplace();
  const auto device = prompt_ids.device();
  const auto long_options = torch::TensorOptions().dtype(torch::kLong).device(device);

  auto ids = torch::empty({b, p + g}, long_options);
  ids.narrow(1, 0, p).copy_(prompt_ids);
  auto mask = torch::ones({b, p + g}, long_options);
  if (prompt_mask.defined()) mask.narrow(1, 0, p).copy_(prompt_mask);
  auto logprobs = torch::zeros({b, g}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  auto sampling_logprobs = torch::zeros_like(logprobs);
  auto alive = torch::ones({b}, torch::TensorOptions().dtype(torch::kBool).device(device));

  // Uniforms come from a CPU generator seeded per call, so samples do not depend on the device or global state.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(config.seed);
  auto uniforms = torch::rand({g, b}, generator, torch::TensorOptions().dtype(torch::kFloat)).to(device);

  auto cache = model.new_cache(b, p + g);
  auto hidden = model.forward(prompt_ids, mask.narrow(1, 0, p), &cache);  // [B, P, D]
  int64_t produced = 0;
  for (int64_t step = 0; step < g; ++step) {
    auto last = hidden.select(1, hidden.size(1) - 1);  // [B, D]
    if (on_hidden) on_hidden(step, last);
    auto logits = model.logits(last);  // [B, V] fp32
    torch::Tensor token, sample_lp;
    const double temperature = config.temperature == 0 ? 1.0 : config.temperature;
    if (config.temperature == 0) {
      token = logits.argmax(-1);
      sample_lp = torch::zeros({b}, logits.options());
    } else {
      auto scaled = config.temperature == 1.0 ? logits : logits / config.temperature;  // no [B, V] pass at T = 1
      std::tie(token, sample_lp) = detail::draw_token(scaled, uniforms[step], config.top_k, config.top_p);
    }
    logprobs.select(1, step).copy_(detail::token_logprobs(logits, token, temperature));
    sampling_logprobs.select(1, step).copy_(sample_lp);
    if (config.stop_at_eos) {
      token = torch::where(alive, token, torch::full_like(token, config.pad_id));
      mask.select(1, p + step).copy_(alive);
      alive = alive & token.ne(*config.eos_id);
    }
    ids.select(1, p + step).copy_(token);
    produced = step + 1;
    if (config.stop_at_eos && !alive.any().item<bool>()) break;
    if (step + 1 < g) hidden = model.forward(token.unsqueeze(1), mask.narrow(1, 0, p + step + 1), &cache);
  }
  if (produced < g) {  // every row ended early: the rest is padding
    ids.narrow(1, p + produced, g - produced).fill_(config.pad_id);
    mask.narrow(1, p + produced, g - produced).zero_();
  }
  if (config.stop_at_eos) {
    logprobs.mul_(mask.narrow(1, p, g));
    sampling_logprobs.mul_(mask.narrow(1, p, g));
  }
  if (was_training) model.train();
  Generation out{ids, mask, logprobs, sampling_logprobs, mask.narrow(1, p, g).clone(), p};
  return out;
}

}  // namespace rlhf
