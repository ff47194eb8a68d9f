#pragma once
/// @file LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
/// Language Models", arXiv 2106.09685), as the adapter policy of a model: `GPT2<LoRA<8, Targets::Attention>>`.
/// Adapters can be merged into the base weights, disabled in a scope (the PPO reference model is the policy's own
/// weights with adapters off) and saved / loaded alone in PEFT's format (adapter_model.safetensors +
/// adapter_config.json).

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/core/gemm.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/model/capture_point.hpp>

namespace rlhf {

// ---- targets ----

/// Which projections get adapters: one bit per LinearRole, and the usual sets. Combine with `|`:
/// `Targets::Attention | Targets::MLP`.
enum class Targets : unsigned {
  AttnQKV = 1u << 0,                  ///< LinearRole::attn_qkv
  AttnOut = 1u << 1,                  ///< LinearRole::attn_out
  MLPIn = 1u << 2,                    ///< LinearRole::mlp_in
  MLPOut = 1u << 3,                   ///< LinearRole::mlp_out
  MLPGate = 1u << 4,                  ///< LinearRole::mlp_gate
  MLPUp = 1u << 5,                    ///< LinearRole::mlp_up
  MLPDown = 1u << 6,                  ///< LinearRole::mlp_down
  Attention = AttnQKV | AttnOut,      ///< every attention projection
  MLP = MLPIn | MLPOut,               ///< the two projections of a GPT-2 MLP
  GatedMLP = MLPGate | MLPUp | MLPDown,  ///< the three projections of a gated (Llama) MLP
  All = Attention | MLP | GatedMLP,   ///< every projection
};

/// The union of two target sets.
inline constexpr Targets operator|(Targets a, Targets b) {
  return static_cast<Targets>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

/// The target bit of one role.
inline constexpr Targets target_of(LinearRole role) { return static_cast<Targets>(1u << static_cast<unsigned>(role)); }

/// True when `targets` includes `role`.
inline constexpr bool is_targeted(Targets targets, LinearRole role) {
  return (static_cast<unsigned>(targets) & static_cast<unsigned>(target_of(role))) != 0;
}

// ---- the layer ----

/// Runtime options of LoRA layers, set on a whole model with set_lora_options(). The defaults hold without it.
struct LoRAOptions {
  double alpha = 16;    ///< the update is scaled by alpha / rank, e.g. 16 with rank 8 gives 2
  double dropout = 0.0; ///< dropout on the adapter's input, in training mode only, e.g. 0.05
};

/// What a LoRAConv1D is built from.
struct LoRAConv1DOptions {
  int64_t in_features = 0;   ///< e.g. 768
  int64_t out_features = 0;  ///< e.g. 2304 for GPT-2 small's c_attn
  double init_std = 0.02;    ///< standard deviation of the base weight's normal initialisation
  int64_t rank = 0;          ///< adapter rank, e.g. 8; 0 = no adapter (a frozen plain Conv1D)
  LinearRole role = LinearRole::attn_qkv;  ///< which projection this is
};

/// A GPT-2 Conv1D (weight [in, out], bias [out], the checkpoint layout and names) with a LoRA adapter:
/// y = x W + b + scale * dropout(x) A^T B^T, with lora_A [rank, in] (kaiming-uniform, as PEFT) and lora_B [out, rank]
/// (zeros, so a fresh layer equals its base) and scale = alpha / rank. W and b are frozen by LoRA::prepare_model.
/// The adapter can be merged into W (then forward skips it), disabled (forward is the base layer's), or absent
/// (rank 0: an untargeted projection).
class LoRAConv1DImpl : public torch::nn::Module {
 public:
  explicit LoRAConv1DImpl(const LoRAConv1DOptions& options) : options_(options) {
    if (options.in_features <= 0 || options.out_features <= 0 || options.rank < 0)
      detail::fail("LoRAConv1D: in_features ({}) and out_features ({}) must be positive and rank ({}) >= 0",
                   options.in_features, options.out_features, options.rank);
    weight = register_parameter("weight", torch::empty({options.in_features, options.out_features}));
    bias = register_parameter("bias", torch::empty({options.out_features}));
    if (options.rank > 0) {
      lora_A = register_parameter("lora_A", torch::empty({options.rank, options.in_features}));
      lora_B = register_parameter("lora_B", torch::empty({options.out_features, options.rank}));
    }
    reset();
  }

  /// Re-initialises W ~ N(0, init_std^2), b = 0, A kaiming-uniform (a = sqrt(5), as torch.nn.Linear and PEFT) and
  /// B = 0. Refused while merged.
  void reset() {
    if (merged_) detail::fail("LoRAConv1D ({}): reset() on a merged layer; unmerge_adapters() first",
                              role_name(options_.role));
    torch::NoGradGuard no_grad;
    weight.normal_(0.0, options_.init_std);
    bias.zero_();
    if (has_adapter()) {
      torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
      lora_B.zero_();
    }
  }

  /// x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x) {
    auto flat = x.reshape({-1, options_.in_features});  // [N, in]
    auto shape = x.sizes().vec();
    shape.back() = options_.out_features;
    auto y = linear_addmm(bias, flat, weight);  // [N, out], on the kernels Conv1D takes
    // The delta is added when the adapter is on and not merged, subtracted when merged but disabled.
    const double sign = !has_adapter() ? 0.0 : merged_ ? (enabled() ? 0.0 : -1.0) : (enabled() ? 1.0 : 0.0);
    if (sign != 0.0) {
      const double s = merged_ ? merged_scale_ : scale();
      auto input = is_training() && lora_options_.dropout > 0 ? torch::dropout(flat, lora_options_.dropout, true)
                                                              : flat;
      auto down = torch::mm(input, lora_A.t());                 // [N, rank]
      y = torch::addmm(y, down, lora_B.t(), /*beta=*/1, /*alpha=*/sign * s);  // [N, out]
      if (capture && sign == 1.0 && !merged_) {  // the adapter's own path: per-datum gradients of A and B
        auto in_shape = x.sizes().vec();
        y = y.view(shape);
        capture->on_forward(input.view(in_shape), y);
        return y;
      }
    }
    return y.view(shape);
  }

  /// W += scale * (B A)^T: the adapter's update moves into the [in, out] base weight and forward skips it.
  /// Merging a merged layer does nothing (merge is idempotent). For inference and export, not training (the
  /// adapters get no gradient while merged).
  void merge() {
    if (!has_adapter() || merged_) return;
    torch::NoGradGuard no_grad;
    merged_scale_ = scale();
    weight.add_(delta());
    merged_ = true;
  }

  /// W -= scale * (B A)^T with the scale used when merging: the base weight back (up to rounding). Does nothing on an
  /// unmerged layer.
  void unmerge() {
    if (!has_adapter() || !merged_) return;
    torch::NoGradGuard no_grad;
    weight.sub_(delta(merged_scale_));
    merged_ = false;
  }

  /// Sets alpha and dropout (see LoRAOptions). Throws for alpha <= 0 or dropout outside [0, 1).
  void set_options(const LoRAOptions& options) {
    if (!(options.alpha > 0) || !std::isfinite(options.alpha))
      detail::fail("LoRAOptions: alpha must be positive and finite, got {}", options.alpha);
    if (!(options.dropout >= 0 && options.dropout < 1))
      detail::fail("LoRAOptions: dropout must be in [0, 1), got {}", options.dropout);
    lora_options_ = options;
  }

  /// Turns the adapter off (forward gives the base layer) until a matching enable(); calls nest.
  void disable() { ++disabled_; }
  /// Undoes one disable().
  void enable() {
    if (disabled_ > 0) --disabled_;
  }

  bool has_adapter() const { return options_.rank > 0; }   ///< false for an untargeted projection
  bool enabled() const { return disabled_ == 0; }          ///< false inside an AdaptersDisabled scope
  bool merged() const { return merged_; }                  ///< true after merge()
  int64_t rank() const { return options_.rank; }           ///< 0 without an adapter
  LinearRole role() const { return options_.role; }        ///< which projection this is
  int64_t in_features() const { return options_.in_features; }
  int64_t out_features() const { return options_.out_features; }
  const LoRAOptions& lora_options() const { return lora_options_; }
  /// alpha / rank (0 without an adapter).
  double scale() const { return has_adapter() ? lora_options_.alpha / static_cast<double>(options_.rank) : 0.0; }

  torch::Tensor weight;  ///< [in, out], frozen
  torch::Tensor bias;    ///< [out], frozen
  torch::Tensor lora_A;  ///< [rank, in], undefined without an adapter
  torch::Tensor lora_B;  ///< [out, rank], undefined without an adapter
  /// Observer of the adapter's forwards (not owned; null = none): called with the adapter's input (after its
  /// dropout) and the layer's output while the adapter is on and not merged. Set and cleared by rlhf::ShiftRecorder.
  ForwardCapture* capture = nullptr;

 private:
  torch::Tensor delta(double s) const { return torch::mm(lora_B, lora_A).t().mul(s).to(weight.scalar_type()); }
  torch::Tensor delta() const { return delta(scale()); }  // [in, out]

  LoRAConv1DOptions options_;
  LoRAOptions lora_options_;
  int disabled_ = 0;
  bool merged_ = false;
  double merged_scale_ = 0;
};
TORCH_MODULE(LoRAConv1D);

// ---- the policy ----

/// Adapter policy: rank-`Rank` LoRA adapters (Hu et al. 2021, arXiv 2106.09685) on the projections in `T`
/// (default: attention). Every projection is a LoRAConv1D, with an adapter when targeted; once the model is built,
/// every parameter that is not an adapter's (embeddings, layernorms, base weights, untargeted projections) is frozen,
/// so an optimiser over the trainable parameters sees only the adapters (and, in ActorCritic, the value head).
template <int Rank, Targets T = Targets::Attention>
struct LoRA {
  static_assert(Rank > 0, "LoRA: the rank must be positive");

  using Linear = LoRAConv1D;  ///< the layer type every projection uses
  static constexpr int kRank = Rank;            ///< adapter rank
  static constexpr Targets kTargets = T;        ///< adapted projections
  static constexpr bool has_adapters = true;    ///< the PPO reference is this model with adapters disabled

  /// A LoRAConv1D [in] -> [out], with a rank-Rank adapter when `role` is in T.
  static Linear make_linear(int64_t in, int64_t out, double init_std, LinearRole role) {
    return Linear(LoRAConv1DOptions{.in_features = in, .out_features = out, .init_std = init_std,
                                    .rank = is_targeted(T, role) ? Rank : 0, .role = role});
  }

  /// Freezes every parameter of `model` except the adapters' lora_A and lora_B.
  static void prepare_model(torch::nn::Module& model) {
    for (auto& item : model.named_parameters()) item.value().requires_grad_(is_adapter_parameter(item.key()));
  }
};

// ---- whole-model operations ----

namespace detail {

/// The LoRA layers inside `module` (not `module` itself), in registration order.
inline std::vector<std::shared_ptr<LoRAConv1DImpl>> lora_layers(torch::nn::Module& module) {
  std::vector<std::shared_ptr<LoRAConv1DImpl>> out;
  for (const auto& child : module.modules(/*include_self=*/false))
    if (auto layer = std::dynamic_pointer_cast<LoRAConv1DImpl>(child)) out.push_back(std::move(layer));
  return out;
}

/// The LoRA layers inside `module` with their qualified names (e.g. "base.transformer.h.0.attn.c_attn").
inline std::vector<std::pair<std::string, std::shared_ptr<LoRAConv1DImpl>>> named_lora_layers(
    torch::nn::Module& module) {
  std::vector<std::pair<std::string, std::shared_ptr<LoRAConv1DImpl>>> out;
  for (const auto& item : module.named_modules("", /*include_self=*/false))
    if (auto layer = std::dynamic_pointer_cast<LoRAConv1DImpl>(item.value())) out.emplace_back(item.key(), layer);
  return out;
}

/// The Hugging Face name of a layer: its path from "transformer." on (a policy's "base." prefix dropped).
inline std::string hf_module_name(const std::string& path) {
  if (path.rfind("transformer.", 0) == 0) return path;
  const auto at = path.find(".transformer.");
  return at == std::string::npos ? path : path.substr(at + 1);
}

/// The last `n` dot-separated components of `name` ("h.0.attn.c_proj", 2 -> "attn.c_proj").
inline std::string last_components(const std::string& name, int n) {
  auto pos = name.size();
  for (int i = 0; i < n; ++i) {
    if (pos == 0) return name;
    const auto dot = name.rfind('.', pos - 1);
    if (dot == std::string::npos) return name;
    pos = dot;
  }
  return name.substr(pos + 1);
}

/// "[2, 3]" for a shape.
inline std::string lora_shape(torch::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

}  // namespace detail

/// Sets alpha and dropout of every LoRA layer in `module`.
inline void set_lora_options(torch::nn::Module& module, const LoRAOptions& options) {
  for (auto& layer : detail::lora_layers(module)) layer->set_options(options);
}
/// As above for a module holder (`set_lora_options(model, {.alpha = 32})`).
template <class M>
void set_lora_options(torch::nn::ModuleHolder<M>& module, const LoRAOptions& options) {
  set_lora_options(*module, options);
}

/// Merges every adapter of `module` into its base weight (see LoRAConv1DImpl::merge; idempotent).
inline void merge_adapters(torch::nn::Module& module) {
  for (auto& layer : detail::lora_layers(module)) layer->merge();
}
/// As above for a module holder.
template <class M>
void merge_adapters(torch::nn::ModuleHolder<M>& module) {
  merge_adapters(*module);
}

/// Takes every merged adapter of `module` back out of its base weight (see LoRAConv1DImpl::unmerge).
inline void unmerge_adapters(torch::nn::Module& module) {
  for (auto& layer : detail::lora_layers(module)) layer->unmerge();
}
/// As above for a module holder.
template <class M>
void unmerge_adapters(torch::nn::ModuleHolder<M>& module) {
  unmerge_adapters(*module);
}

/// RAII scope in which every LoRA adapter of a module is off, so the module computes its base model:
/// `{ rlhf::AdaptersDisabled off(policy); auto ref = policy->forward(ids); }`. Scopes nest; the adapters come back
/// when the guard is destroyed, also when an exception leaves the scope. A merged layer subtracts its delta while
/// disabled (the base output up to rounding).
class AdaptersDisabled {
 public:
  /// Disables the adapters of the LoRA layers inside `module`.
  explicit AdaptersDisabled(torch::nn::Module& module) : layers_(detail::lora_layers(module)) {
    for (auto& layer : layers_) layer->disable();
  }
  /// As above for a module holder.
  template <class M>
  explicit AdaptersDisabled(torch::nn::ModuleHolder<M>& module) : AdaptersDisabled(*module) {}
  ~AdaptersDisabled() {
    for (auto& layer : layers_) layer->enable();
  }
  AdaptersDisabled(const AdaptersDisabled&) = delete;
  AdaptersDisabled& operator=(const AdaptersDisabled&) = delete;

 private:
  std::vector<std::shared_ptr<LoRAConv1DImpl>> layers_;
};

// ---- saving and loading (PEFT format) ----

/// Writes the adapters of `module` (a LoRA GPT-2 or a policy around one) into `dir` as PEFT saves a LoRA model, each
/// file atomically:
/// - adapter_model.safetensors: `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` [r, in] and
///   `...lora_B.weight` [out, r] for every adapted layer (a policy's "base." prefix dropped; the value head is not
///   written);
/// - adapter_config.json: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, fan_in_fan_out true
///   (GPT-2's Conv1D stores weights [in, out]), bias "none", base_model_name_or_path "", and target_modules: the leaf
///   names of the adapted layers ("c_attn", "c_fc", "c_proj"), qualified with their parent ("attn.c_proj",
///   "mlp.c_proj") when a leaf name also belongs to an unadapted layer, since PEFT matches a target by name suffix and
///   GPT-2's attention and MLP output projections are both "c_proj".
/// Throws rlhf::Error when `module` has no adapters.
inline void save_adapters(torch::nn::Module& module, const std::filesystem::path& dir) {
  const auto layers = detail::named_lora_layers(module);
  std::map<std::string, torch::Tensor> tensors;
  std::set<std::string> adapted_leaves, plain_leaves, targets;
  const LoRAConv1DImpl* first = nullptr;
  for (const auto& [path, layer] : layers) {
    const auto name = detail::hf_module_name(path);
    if (!layer->has_adapter()) {
      plain_leaves.insert(detail::last_components(name, 1));
      continue;
    }
    if (!first) first = layer.get();
    if (layer->rank() != first->rank())
      detail::fail("save_adapters: layer '{}' has rank {} but other layers rank {}; adapter_config.json has one r",
                   name, layer->rank(), first->rank());
    tensors.emplace("base_model.model." + name + ".lora_A.weight", layer->lora_A.detach());
    tensors.emplace("base_model.model." + name + ".lora_B.weight", layer->lora_B.detach());
    adapted_leaves.insert(detail::last_components(name, 1));
  }
  if (!first) detail::fail("save_adapters: {}: the model has no LoRA adapters to save", dir.string());
  for (const auto& [path, layer] : layers) {
    if (!layer->has_adapter()) continue;
    const auto name = detail::hf_module_name(path);
    const auto leaf = detail::last_components(name, 1);
    targets.insert(plain_leaves.contains(leaf) ? detail::last_components(name, 2) : leaf);
  }
  nlohmann::ordered_json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", ""},
      {"r", first->rank()},
      {"lora_alpha", first->lora_options().alpha},
      {"lora_dropout", first->lora_options().dropout},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"fan_in_fan_out", true},
      {"bias", "none"},
      {"inference_mode", true},
  };
  std::filesystem::create_directories(dir);
  save_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_file_atomic(dir / "adapter_config.json", config.dump(2) + "\n");
}
/// As above for a module holder.
template <class M>
void save_adapters(torch::nn::ModuleHolder<M>& module, const std::filesystem::path& dir) {
  save_adapters(*module, dir);
}

/// Loads adapters saved by save_adapters() (or by PEFT for the same GPT-2 architecture) from `dir` into the LoRA
/// layers of `module`, and sets lora_alpha and lora_dropout from adapter_config.json on them. The model must have an
/// adapter exactly where the file has one, with the file's rank. Errors name the file and the field or tensor:
/// a peft_type other than "LORA", r different from the model's rank, a missing, unexpected or misshapen tensor.
inline void load_adapters(torch::nn::Module& module, const std::filesystem::path& dir) {
  const auto config_path = dir / "adapter_config.json";
  const auto weights_path = dir / "adapter_model.safetensors";
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(read_file(config_path));
  } catch (const nlohmann::json::exception& e) {
    detail::fail("load_adapters: {}: not valid JSON: {}", config_path.string(), e.what());
  }
  auto field = [&](const char* key) -> const nlohmann::json& {
    if (!config.is_object() || !config.contains(key))
      detail::fail("load_adapters: {}: missing field '{}'", config_path.string(), key);
    return config.at(key);
  };
  if (!field("peft_type").is_string() || field("peft_type").get<std::string>() != "LORA")
    detail::fail("load_adapters: {}: peft_type is {}, expected \"LORA\"", config_path.string(),
                 field("peft_type").dump());
  if (!field("r").is_number_integer())
    detail::fail("load_adapters: {}: field 'r' must be an integer, got {}", config_path.string(), field("r").dump());
  const int64_t r = field("r").get<int64_t>();
  LoRAOptions options;
  if (config.contains("lora_alpha")) options.alpha = field("lora_alpha").get<double>();
  if (config.contains("lora_dropout")) options.dropout = field("lora_dropout").get<double>();

  const auto layers = detail::named_lora_layers(module);
  std::map<std::string, torch::Tensor> expected;  // file name -> parameter
  for (const auto& [path, layer] : layers) {
    if (!layer->has_adapter()) continue;
    const auto name = detail::hf_module_name(path);
    if (layer->rank() != r)
      detail::fail("load_adapters: {}: r = {}, but the model's layer '{}' has LoRA rank {} (---> HINT: declare the "
                   "model with LoRA<{}, ...>)",
                   config_path.string(), r, name, layer->rank(), r);
    if (layer->merged())
      detail::fail("load_adapters: layer '{}' is merged; unmerge_adapters() before loading adapters", name);
    expected.emplace("base_model.model." + name + ".lora_A.weight", layer->lora_A);
    expected.emplace("base_model.model." + name + ".lora_B.weight", layer->lora_B);
  }
  if (expected.empty()) detail::fail("load_adapters: {}: the model has no LoRA adapters to load into", dir.string());

  SafetensorsFile file(weights_path);
  const auto where = weights_path.string();
  for (const auto& info : file.tensors())
    if (!expected.contains(info.name))
      detail::fail("load_adapters: {}: unexpected tensor '{}' (the model has no adapter there; ---> HINT: the "
                   "model's LoRA targets differ from adapter_config.json's target_modules)",
                   where, info.name);
  for (const auto& [name, param] : expected) {
    const TensorInfo* info = file.find(name);
    if (!info)
      detail::fail("load_adapters: {}: missing tensor '{}' (expected shape {})", where, name,
                   detail::lora_shape(param.sizes()));
    if (param.sizes() != torch::IntArrayRef(info->shape))
      detail::fail("load_adapters: {}: tensor '{}' has shape {}, the model expects {}", where, name,
                   detail::lora_shape(info->shape), detail::lora_shape(param.sizes()));
  }
  for (const auto& [path, layer] : layers)
    if (layer->has_adapter()) layer->set_options(options);
  torch::NoGradGuard no_grad;
  for (auto& [name, param] : expected) param.copy_(file.view(name));
}
/// As above for a module holder.
template <class M>
void load_adapters(torch::nn::ModuleHolder<M>& module, const std::filesystem::path& dir) {
  load_adapters(*module, dir);
}

}  // namespace rlhf
