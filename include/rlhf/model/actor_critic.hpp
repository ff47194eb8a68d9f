#pragma once
/// @file A policy for PPO: a base language model and a value head on its final-layernorm residual.

#include <concepts>
#include <cstdint>
#include <filesystem>
#include <vector>

#include <torch/torch.h>

#include <rlhf/model/gpt2.hpp>
#include <rlhf/model/kv_cache.hpp>
#include <rlhf/model/value_head.hpp>

namespace rlhf {

/// A base language model, as a LibTorch module holder `B` around `B::Impl`: `forward(ids, mask, KVCache*)`
/// returns the final-layernorm output [B, T, D], `logits(hidden)` projects it to the vocabulary, `config()` has
/// `n_embd`, `vocab_size` and `n_positions`, `new_cache(batch, capacity)` makes a KV cache, and
/// `B::from_pretrained(dir, LoadOptions)` loads a folder.
template <class B>
concept BaseModel = requires(typename B::Impl& impl, const torch::Tensor& t, KVCache* cache) {
  typename B::Impl;
  { impl.forward(t, t, cache) } -> std::convertible_to<torch::Tensor>;
  { impl.logits(t) } -> std::convertible_to<torch::Tensor>;
  { impl.config().n_embd } -> std::convertible_to<int64_t>;
  { impl.config().vocab_size } -> std::convertible_to<int64_t>;
  { impl.new_cache(int64_t{}, int64_t{}) } -> std::same_as<KVCache>;
  { B::from_pretrained(std::filesystem::path{}, LoadOptions{}) } -> std::same_as<B>;
};

/// Copies every parameter of `from` into the parameter of the same name of `to` (same architecture).
inline void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto target = to.named_parameters();
  for (const auto& item : from.named_parameters()) target[item.key()].copy_(item.value());
}

/// The PPO policy: `Base` (e.g. GPT2<>) produces the residual stream and token logits; `Head` (e.g. MLPValueHead)
/// estimates values from the final-layernorm output, as the seed notebook's hook on `ln_final.hook_normalized` does.
template <class Base = GPT2<>, class Head = MLPValueHead>
class ActorCriticImpl : public torch::nn::Module {
  static_assert(BaseModel<Base>, "ActorCritic: the base model slot needs forward(ids, mask, KVCache*), "
                                 "logits(hidden), config() with n_embd/vocab_size, new_cache(), from_pretrained()");
  static_assert(ValueHead<Head>, "ActorCritic: the value head slot needs a constructor Head(d_model) and "
                                 "forward(hidden [B, T, D]) -> values [B, T]");

 public:
  using BaseType = Base;
  using HeadType = Head;

  /// Wraps `base_model` and a fresh value head of its width.
  explicit ActorCriticImpl(Base base_model) : base(std::move(base_model)), head(base->config().n_embd) {
    register_module("base", base.ptr());
    register_module("value_head", head.ptr());
    head->to(base->device());
  }

  /// Loads the base model from a Hugging Face folder and adds a fresh value head.
  static std::shared_ptr<ActorCriticImpl> from_pretrained(const std::filesystem::path& dir,
                                                          const LoadOptions& options = {}) {
    return std::make_shared<ActorCriticImpl>(Base::from_pretrained(dir, options));
  }

  /// Final-layernorm output [B, T, D] (fp32) of the base model.
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask = {}) { return base->forward(ids, mask); }
  /// Values [B, T] from final-layernorm outputs [B, T, D].
  torch::Tensor values(const torch::Tensor& hidden) { return head->forward(hidden); }

  /// Parameters of the base model that are trained (requires_grad).
  std::vector<torch::Tensor> base_parameters() const { return trainable(base->parameters()); }
  /// Parameters of the value head that are trained.
  std::vector<torch::Tensor> head_parameters() const { return trainable(head->parameters()); }

  Base base;
  Head head;

 private:
  static std::vector<torch::Tensor> trainable(const std::vector<torch::Tensor>& params) {
    std::vector<torch::Tensor> out;
    for (const auto& p : params)
      if (p.requires_grad()) out.push_back(p);
    return out;
  }
};

/// Module holder: `ActorCritic<> policy(GPT2<>(config));` or `ActorCritic<>::from_pretrained("models/gpt2")`.
template <class Base = GPT2<>, class Head = MLPValueHead>
class ActorCritic : public torch::nn::ModuleHolder<ActorCriticImpl<Base, Head>> {
 public:
  using Impl = ActorCriticImpl<Base, Head>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  /// Loads the base model from a Hugging Face folder (config.json + model.safetensors) and adds a fresh value head.
  static ActorCritic from_pretrained(const std::filesystem::path& dir, const LoadOptions& options = {}) {
    return ActorCritic(Impl::from_pretrained(dir, options));
  }
};

}  // namespace rlhf
