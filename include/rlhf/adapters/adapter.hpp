#pragma once
/// @file What every adapter policy shares: the roles of the linear layers a model builds through it, and the
/// questions the rest of the library asks about a policy (does it add adapters, is a parameter an adapter's).

#include <concepts>
#include <cstdint>
#include <string_view>

#include <torch/torch.h>

namespace rlhf {

/// Which projection of a transformer a linear layer is. A model passes it to `Adapter::make_linear` so the adapter
/// policy can decide per projection (e.g. LoRA only on attention). GPT-2 uses the first four; the gated-MLP roles
/// are for Llama-style models.
enum class LinearRole {
  attn_qkv,  ///< fused query/key/value projection (GPT-2 attn.c_attn)
  attn_out,  ///< attention output projection (GPT-2 attn.c_proj)
  mlp_in,    ///< MLP input projection (GPT-2 mlp.c_fc)
  mlp_out,   ///< MLP output projection (GPT-2 mlp.c_proj)
  mlp_gate,  ///< gated MLP gate projection (Llama mlp.gate_proj)
  mlp_up,    ///< gated MLP up projection (Llama mlp.up_proj)
  mlp_down,  ///< gated MLP down projection (Llama mlp.down_proj)
};

/// The role's name as written in this enum, e.g. "attn_qkv".
inline constexpr std::string_view role_name(LinearRole role) {
  switch (role) {
    case LinearRole::attn_qkv: return "attn_qkv";
    case LinearRole::attn_out: return "attn_out";
    case LinearRole::mlp_in: return "mlp_in";
    case LinearRole::mlp_out: return "mlp_out";
    case LinearRole::mlp_gate: return "mlp_gate";
    case LinearRole::mlp_up: return "mlp_up";
    case LinearRole::mlp_down: return "mlp_down";
  }
  return "unknown";
}

/// An adapter policy: `Adapter::Linear` is a LibTorch module holder whose forward maps [..., in] to [..., out] and
/// which has `reset()`; `Adapter::make_linear(in, out, init_std, role)` builds one (its base weight ~ N(0, init_std));
/// `Adapter::has_adapters` says whether the layers carry trainable adapters next to frozen base weights;
/// `Adapter::prepare_model(module)` runs once a model is built (LoRA freezes every non-adapter parameter there).
template <class A>
concept AdapterPolicy = requires(int64_t n, double std, LinearRole role, torch::nn::Module& module) {
  typename A::Linear;
  { A::make_linear(n, n, std, role) } -> std::same_as<typename A::Linear>;
  { A::has_adapters } -> std::convertible_to<bool>;
  A::prepare_model(module);
};

/// True for the parameter names adapters add ("...lora_A", "...lora_B"): they are not part of a base checkpoint.
inline bool is_adapter_parameter(std::string_view name) {
  const auto dot = name.rfind('.');
  const auto leaf = dot == std::string_view::npos ? name : name.substr(dot + 1);
  return leaf == "lora_A" || leaf == "lora_B";
}

/// True when the base model `B` (a module holder with `B::Impl::AdapterPolicy`) carries adapters, so its own weights
/// with the adapters disabled are the reference model.
template <class B>
inline constexpr bool has_adapters_v = requires { requires B::Impl::AdapterPolicy::has_adapters; };

}  // namespace rlhf
