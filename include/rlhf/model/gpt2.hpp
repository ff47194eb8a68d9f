#pragma once
/// @file GPT-2 with Hugging Face parameter names and weight layout, padded batches and a KV cache.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/adapters/no_adapter.hpp>
#include <rlhf/core/attention.hpp>
#include <rlhf/core/decode_attention.hpp>
#include <rlhf/core/gelu.hpp>
#include <rlhf/core/gemm.hpp>
#include <rlhf/core/layer_norm.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/core/small_matmul.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/model/capture_point.hpp>
#include <rlhf/model/conv1d.hpp>
#include <rlhf/model/gpt2_config.hpp>
#include <rlhf/model/kv_cache.hpp>

namespace rlhf {

// ---- building blocks ----

/// Layernorm computed in fp32 whatever the input dtype (bf16 layernorms lose too much); returns fp32. Calls the
/// layernorm's capture point, when set, with the fp32 input and the output. Without a graph to record (sampling, the
/// reference's forward) the AVX-512 kernel of core/layer_norm.hpp computes it.
inline torch::Tensor layer_norm_fp32(const torch::Tensor& x, GPT2LayerNormImpl& ln) {
  const auto& opts = ln.options;
  auto input = x.to(torch::kFloat);
  torch::Tensor y;
  if (opts.normalized_shape().size() == 1) y = layer_norm_rows(input, ln.weight, ln.bias, opts.eps());
  if (!y.defined())
    y = torch::layer_norm(input, opts.normalized_shape(), ln.weight.to(torch::kFloat), ln.bias.to(torch::kFloat),
                          opts.eps());
  if (ln.capture) ln.capture->on_forward(input, y);
  return y;
}

/// The fixed position table of Vaswani et al. 2017 (arXiv 1706.03762) as PyTorch's transformer tutorial builds it:
/// [n_positions, d] with column 2i = sin(p w_i) and column 2i + 1 = cos(p w_i), w_i = 10000^(-2i / d); `d` even.
inline torch::Tensor sinusoidal_position_table(int64_t n_positions, int64_t d) {
  auto position = torch::arange(n_positions, torch::kFloat).unsqueeze(1);                           // [P, 1]
  auto rate = torch::exp(torch::arange(0, d, 2, torch::kFloat) * (-std::log(10000.0) / static_cast<double>(d)));
  auto table = torch::zeros({n_positions, d});                                                     // [P, D]
  table.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, d, 2)}, torch::sin(position * rate));
  table.index_put_({torch::indexing::Slice(), torch::indexing::Slice(1, d, 2)}, torch::cos(position * rate));
  return table;
}

/// The activation named by GPT2Config::activation_function. gelu_new is the tanh approximation of GELU.
inline torch::Tensor gpt2_activation(const torch::Tensor& x, const std::string& name) {
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") return gelu_tanh(x);  // core/gelu.hpp
  if (name == "gelu") return torch::gelu(x);
  return torch::relu(x);
}

/// Additive attention bias [B, 1, T, S] (0 where a query may attend, -inf elsewhere) for `t` new queries after
/// `past` cached positions: causal, and blind to padded keys (`key_mask` [B, S], nonzero = real token). Every
/// query may attend to itself, so rows of padded queries stay finite (their outputs are ignored).
inline torch::Tensor attention_bias(const torch::Tensor& key_mask, int64_t past, int64_t t,
                                    torch::ScalarType dtype) {
  const int64_t s = past + t;
  auto device = key_mask.device();
  auto q_pos = torch::arange(past, s, torch::TensorOptions().dtype(torch::kLong).device(device)).unsqueeze(1);
  auto k_pos = torch::arange(0, s, torch::TensorOptions().dtype(torch::kLong).device(device)).unsqueeze(0);
  auto causal = k_pos.le(q_pos);                                     // [T, S]
  auto allowed = causal.unsqueeze(0) & key_mask.ne(0).unsqueeze(1);  // [B, T, S]
  allowed = allowed | k_pos.eq(q_pos).unsqueeze(0);
  auto bias = torch::zeros(allowed.sizes(), torch::TensorOptions().dtype(dtype).device(device));
  bias.masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  return bias.unsqueeze(1);  // [B, 1, T, S]
}

/// Position ids [B, t] of `t` new tokens: each row counts only its real tokens, so a left-padded prompt gets the
/// same positions as the unpadded one. `mask` [B, past + t] (nonzero = real token) or undefined (no padding).
inline torch::Tensor position_ids_from_mask(const torch::Tensor& mask, int64_t past, int64_t t, int64_t batch,
                                            torch::Device device) {
  if (!mask.defined())
    return torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kLong).device(device))
        .unsqueeze(0)
        .expand({batch, t});
  auto positions = mask.ne(0).to(torch::kLong).cumsum(1).sub_(1).clamp_min_(0);  // [B, past + t]
  return positions.narrow(1, past, t);
}

/// Multi-head causal self-attention of GPT-2 (fused q/k/v projection c_attn, output projection c_proj).
template <class Adapter = NoAdapter>
class GPT2AttentionImpl : public torch::nn::Module {
 public:
  using Linear = typename Adapter::Linear;

  GPT2AttentionImpl(const GPT2Config& config, int64_t layer_idx)
      : n_head_(config.n_head), d_head_(config.d_head()), attn_pdrop_(config.attn_pdrop) {
    const double proj_std = config.initializer_range / std::sqrt(2.0 * config.n_layer);
    c_attn = register_module("c_attn", Adapter::make_linear(config.n_embd, 3 * config.n_embd,
                                                          config.initializer_range, LinearRole::attn_qkv));
    c_proj = register_module("c_proj",
                             Adapter::make_linear(config.n_embd, config.n_embd, proj_std, LinearRole::attn_out));
    scale_ = config.scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(d_head_)) : 1.0;
    if (config.scale_attn_by_inverse_layer_idx) scale_ /= static_cast<double>(layer_idx + 1);
  }

  /// x: [B, T, D]; bias: [B, 1, T, S] from attention_bias(); cache: keys/values of earlier positions (or null).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& bias, KVCache* cache, int64_t layer) {
    const int64_t b = x.size(0), t = x.size(1), d = x.size(2);
    const auto projected = c_attn(x);  // [B, T, 3D]
    if (!cache && !(is_training() && attn_pdrop_ > 0)) {
      // whole sequences (learning updates, the reference's forward): the fused kernels where they apply
      if (auto out = fused_attention(projected, bias, n_head_, scale_); out.defined()) return c_proj(out);
    }
    // unbind, not three selects: its backward stacks the three gradients, where each select's would zero-fill a
    // gradient of all of qkv and the three would then be added (~65 ms of a bf16 PPO phase's learning updates)
    const auto qkv = projected.view({b, t, 3, n_head_, d_head_}).permute({2, 0, 3, 1, 4}).unbind(0);  // [B, H, T, Dh]
    auto q = qkv[0], k = qkv[1], v = qkv[2];
    if (cache) std::tie(k, v) = cache->append(layer, k, v);  // [B, H, S, Dh]
    torch::Tensor out;                                        // [B, H, T, Dh]
    if (t == 1 && !is_training()) {
      // One query per row (a decoding step): fused on the CPU (core/decode_attention.hpp), else broadcast products
      // (LibTorch's CPU bmm would loop over the B*H matrix-vector products one small gemm at a time).
      out = decode_attention(q, k, v, bias, scale_);
      if (!out.defined()) {
        // Under autocast the cache holds bf16 keys and values: products in fp32, as autocast's bf16 matmul sums them
        // (a bf16 broadcast product would round each one).
        const bool widen = autocast_enabled(q.device().type());
        auto scores = ((widen ? q.to(torch::kFloat) : q) * k).sum(-1, /*keepdim=*/false, torch::kFloat);
        auto probs = torch::softmax(scores.mul_(scale_).unsqueeze(2).add_(bias), -1);  // [B, H, 1, S]
        if (!widen) probs = probs.to(v.scalar_type());
        out = (probs.transpose(-2, -1) * v).sum(2, /*keepdim=*/true);
      }
    } else {
      auto scores = torch::matmul(q, k.transpose(-2, -1)).to(torch::kFloat).mul_(scale_).add_(bias);  // [B,H,T,S]
      auto probs = torch::softmax(scores, -1).to(v.scalar_type());
      if (is_training() && attn_pdrop_ > 0) probs = torch::dropout(probs, attn_pdrop_, true);
      out = torch::matmul(probs, v);
    }
    return c_proj(out.transpose(1, 2).reshape({b, t, d}));  // [B, T, D]
  }

  Linear c_attn{nullptr};  ///< [D] -> [3D]: queries, keys, values
  Linear c_proj{nullptr};  ///< [D] -> [D]

 private:
  int64_t n_head_, d_head_;
  double attn_pdrop_;
  double scale_ = 1.0;
};

/// The GPT-2 MLP: c_fc (D -> d_mlp), activation, c_proj (d_mlp -> D).
template <class Adapter = NoAdapter>
class GPT2MLPImpl : public torch::nn::Module {
 public:
  using Linear = typename Adapter::Linear;

  explicit GPT2MLPImpl(const GPT2Config& config) : activation_(config.activation_function) {
    const double proj_std = config.initializer_range / std::sqrt(2.0 * config.n_layer);
    c_fc = register_module(
        "c_fc", Adapter::make_linear(config.n_embd, config.d_mlp(), config.initializer_range, LinearRole::mlp_in));
    c_proj = register_module("c_proj",
                             Adapter::make_linear(config.d_mlp(), config.n_embd, proj_std, LinearRole::mlp_out));
  }

  /// x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x) { return c_proj(gpt2_activation(c_fc(x), activation_)); }

  Linear c_fc{nullptr};    ///< [D] -> [d_mlp]
  Linear c_proj{nullptr};  ///< [d_mlp] -> [D]

 private:
  std::string activation_;
};

/// One pre-layernorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).
template <class Adapter = NoAdapter>
class GPT2BlockImpl : public torch::nn::Module {
 public:
  GPT2BlockImpl(const GPT2Config& config, int64_t layer_idx) : resid_pdrop_(config.resid_pdrop) {
    auto ln_options = torch::nn::LayerNormOptions({config.n_embd}).eps(config.layer_norm_epsilon);
    ln_1 = register_module("ln_1", std::make_shared<GPT2LayerNormImpl>(ln_options));
    attn = register_module("attn", std::make_shared<GPT2AttentionImpl<Adapter>>(config, layer_idx));
    ln_2 = register_module("ln_2", std::make_shared<GPT2LayerNormImpl>(ln_options));
    mlp = register_module("mlp", std::make_shared<GPT2MLPImpl<Adapter>>(config));
  }

  /// x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& bias, KVCache* cache, int64_t layer) {
    const auto dtype = x.scalar_type();
    x = x + dropout(attn->forward(layer_norm_fp32(x, *ln_1).to(dtype), bias, cache, layer));
    return x + dropout(mlp->forward(layer_norm_fp32(x, *ln_2).to(dtype)));
  }

  std::shared_ptr<GPT2LayerNormImpl> ln_1, ln_2;
  std::shared_ptr<GPT2AttentionImpl<Adapter>> attn;
  std::shared_ptr<GPT2MLPImpl<Adapter>> mlp;

 private:
  torch::Tensor dropout(const torch::Tensor& x) {
    return is_training() && resid_pdrop_ > 0 ? torch::dropout(x, resid_pdrop_, true) : x;
  }
  double resid_pdrop_;
};

/// The transformer body, registered as "transformer" so parameter names match Hugging Face's GPT2LMHeadModel.
/// Its capture points (GPT2CapturePoints) observe the embeddings and the tied output projection.
template <class Adapter = NoAdapter>
class GPT2TransformerImpl : public torch::nn::Module, public GPT2CapturePoints {
 public:
  explicit GPT2TransformerImpl(const GPT2Config& config) {
    wte = register_module("wte", torch::nn::Embedding(config.vocab_size, config.n_embd));
    wpe = register_module("wpe", torch::nn::Embedding(config.n_positions, config.n_embd));
    h = register_module("h", torch::nn::ModuleList());
    for (int64_t i = 0; i < config.n_layer; ++i) {
      blocks.push_back(std::make_shared<GPT2BlockImpl<Adapter>>(config, i));
      h->push_back(blocks.back());
    }
    ln_f = register_module("ln_f", std::make_shared<GPT2LayerNormImpl>(
                                       torch::nn::LayerNormOptions({config.n_embd}).eps(config.layer_norm_epsilon)));
  }

  torch::nn::Embedding wte{nullptr};  ///< token embeddings [V, D], tied to the output projection
  torch::nn::Embedding wpe{nullptr};  ///< position embeddings [n_positions, D]
  torch::nn::ModuleList h{nullptr};   ///< the blocks, as registered
  std::vector<std::shared_ptr<GPT2BlockImpl<Adapter>>> blocks;  ///< the same blocks, typed
  std::shared_ptr<GPT2LayerNormImpl> ln_f;  ///< final layernorm
};

// ---- the model ----

/// Where and in which dtype to place a model's weights.
struct LoadOptions {
  torch::Device device = torch::kCPU;             ///< e.g. torch::kCUDA
  std::optional<torch::ScalarType> dtype;         ///< e.g. torch::kBFloat16; unset keeps fp32
};

/// GPT-2 (Radford et al. 2019) with Hugging Face's parameter names ("transformer.h.0.attn.c_attn.weight", ...) and
/// Conv1D weight layout, the language-model head tied to wte, layernorms computed in fp32.
/// `Adapter` is the adapter policy (how linear layers are built, see the AdapterPolicy concept): NoAdapter for plain
/// weights, LoRA<Rank, Targets> for low-rank adapters on frozen weights (then only the adapters train).
template <class Adapter = NoAdapter>
class GPT2Impl : public torch::nn::Module {
  static_assert(AdapterPolicy<Adapter>, "GPT2: the adapter slot needs an AdapterPolicy: Linear, "
                                        "make_linear(in, out, init_std, LinearRole), has_adapters, prepare_model()");

 public:
  using AdapterPolicy = Adapter;  ///< the adapter policy the linear layers were built with

  /// A model with freshly initialised weights (N(0, initializer_range), output projections scaled by
  /// 1/sqrt(2 n_layer) as in GPT-2). Seed with torch::manual_seed for reproducible weights.
  explicit GPT2Impl(GPT2Config config) : config_(std::move(config)) {
    config_.validate();
    transformer = register_module("transformer", std::make_shared<GPT2TransformerImpl<Adapter>>(config_));
    reset_embeddings();
    if (config_.sinusoidal_positions) transformer->wpe->weight.requires_grad_(false);
    Adapter::prepare_model(*this);
  }

  /// Final-layernorm output (the residual stream the value head reads) for `input_ids` [B, T]:
  /// returns [B, T, D] in fp32.
  /// `attention_mask` [B, past + T] (nonzero = real token; undefined = no padding) covers cached and new tokens;
  /// `cache` holds the keys and values of earlier positions and receives the new ones (null = no cache);
  /// `position_ids` [B, T] overrides the positions derived from the mask.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        KVCache* cache = nullptr, torch::Tensor position_ids = {}) {
    const int64_t b = input_ids.size(0), t = input_ids.size(1);
    const int64_t past = cache ? cache->length() : 0;
    check_input(input_ids, attention_mask, past);
    if (!position_ids.defined()) position_ids = position_ids_from_mask(attention_mask, past, t, b, input_ids.device());
    auto key_mask = attention_mask.defined()
                        ? attention_mask
                        : torch::ones({b, past + t}, torch::TensorOptions().dtype(torch::kLong).device(
                                                         input_ids.device()));
    auto bias = attention_bias(key_mask, past, t, torch::kFloat);  // [B, 1, T, S]
    // [B, T, D]: token embeddings (x embedding_scale; the tied output projection stays unscaled) + positions
    auto x = torch::embedding(transformer->wte->weight, input_ids, /*padding_idx=*/-1, /*scale_grad_by_freq=*/false,
                              sparse_embedding_grad_);
    if (config_.embedding_scale != 1.0) x = x * config_.embedding_scale;
    x = x + transformer->wpe(position_ids);
    if (transformer->embedding_capture)
      transformer->embedding_capture->on_embed(input_ids, position_ids, config_.embedding_scale, x);
    if (is_training() && config_.embd_pdrop > 0) x = torch::dropout(x, config_.embd_pdrop, true);
    for (size_t i = 0; i < transformer->blocks.size(); ++i)
      x = transformer->blocks[i]->forward(x, bias, cache, static_cast<int64_t>(i));
    if (cache) cache->advance(t);
    return layer_norm_fp32(x, *transformer->ln_f);
  }

  /// Next-token logits [..., V] (fp32) from final-layernorm outputs [..., D] through the tied output projection.
  /// Pass only the positions you need (e.g. the last one when sampling): the full [B, T, V] is large.
  torch::Tensor logits(const torch::Tensor& hidden) {
    const auto& wte = transformer->wte->weight;  // [V, D]
    auto shape = hidden.sizes().vec();
    shape.back() = wte.size(0);
    // contiguous(): the first decoding step projects a strided [B, D] slice of the prompt's hidden states
    auto rows = hidden.reshape({-1, hidden.size(-1)}).to(wte.scalar_type()).contiguous();
    if (auto y = small_rows_mm_nt(rows, wte); y.defined())  // decoding: one pass over wte (core/small_matmul.hpp)
      return y.to(torch::kFloat).view(shape);  // bf16 under autocast or with bf16 weights, as torch's matmul
    auto y = linear_mm_nt(rows, wte).to(torch::kFloat).view(shape);  // fp32: core/gemm.hpp's kernels
    if (transformer->head_capture) transformer->head_capture->on_forward(hidden, y);
    return y;
  }

  /// The tied output projection's weight [V, D] that logits() multiplies by, for consumers that fuse the projection
  /// with what follows it (projected_token_stats); undefined while a capture observes logits() (the shift recorder
  /// needs the logits made), and the consumer then calls logits().
  torch::Tensor fusable_output_weight() const {
    return transformer->head_capture ? torch::Tensor() : transformer->wte->weight;
  }

  /// A cache for `batch` rows and up to `capacity` positions on the model's device, in the dtype the keys and
  /// values are computed in: the model's, or autocast's when it is on for fp32 weights (the projections then give
  /// bf16 keys and values, which the cache keeps as they are: half the bytes to hold and to read each step).
  KVCache new_cache(int64_t batch, int64_t capacity) const {
    const auto& w = transformer->wte->weight;
    auto options = w.options();
    const auto type = w.device().type();
    if (w.scalar_type() == torch::kFloat && (type == torch::kCPU || type == torch::kCUDA) && autocast_enabled(type))
      options = options.dtype(autocast_dtype(type));
    return KVCache(config_.n_layer, batch, config_.n_head, capacity, config_.d_head(), options);
  }

  /// Re-initialises every weight as a fresh model would be.
  void reset_parameters() {
    for (auto& block : transformer->blocks) {
      block->attn->c_attn->reset();
      block->attn->c_proj->reset();
      block->mlp->c_fc->reset();
      block->mlp->c_proj->reset();
      block->ln_1->reset_parameters();
      block->ln_2->reset_parameters();
    }
    transformer->ln_f->reset_parameters();
    reset_embeddings();
  }

  const GPT2Config& config() const { return config_; }

  /// Whether the token-embedding lookup of forward() gives wte a sparse gradient (the looked-up rows) instead of a
  /// dense [V, D] one. Only for a loss that also goes through the tied output projection (logits(),
  /// projected_token_stats): its dense gradient reaches wte first and autograd adds the sparse one into it in place,
  /// where two dense gradients take two more [V, D] tensors (the lookup's zeros and an out-of-place sum; 147 MiB each
  /// for GPT-2). Without the projection in the loss wte's .grad would be sparse, which AdamW refuses. Off by default;
  /// PPOTrainer and LMTrainer turn it on around their training forwards (SparseEmbeddingGrad).
  bool sparse_embedding_grad() const { return sparse_embedding_grad_; }
  void set_sparse_embedding_grad(bool on) { sparse_embedding_grad_ = on; }

  /// The device of the weights.
  torch::Device device() const { return transformer->wte->weight.device(); }
  /// The dtype of the weights (layernorm parameters stay fp32).
  torch::ScalarType dtype() const { return transformer->wte->weight.scalar_type(); }

  /// Moves the model to `device` and casts its weights to `dtype`, keeping layernorm parameters in fp32.
  void place(torch::Device device, torch::ScalarType dtype) {
    this->to(device, dtype);
    for (auto& module : modules())
      if (dynamic_cast<torch::nn::LayerNormImpl*>(module.get())) module->to(torch::kFloat);
  }

  std::shared_ptr<GPT2TransformerImpl<Adapter>> transformer;

 private:
  void reset_embeddings() {
    torch::NoGradGuard no_grad;
    transformer->wte->weight.normal_(0.0, config_.initializer_range);
    if (config_.sinusoidal_positions)
      transformer->wpe->weight.copy_(sinusoidal_position_table(config_.n_positions, config_.n_embd));
    else
      transformer->wpe->weight.normal_(0.0, config_.initializer_range);
  }

  void check_input(const torch::Tensor& ids, const torch::Tensor& mask, int64_t past) const {
    if (ids.dim() != 2) detail::fail("GPT2: input_ids must be [batch, seq], got {} dims", ids.dim());
    if (past + ids.size(1) > config_.n_positions)
      detail::fail("GPT2: {} positions exceed n_positions = {}", past + ids.size(1), config_.n_positions);
    if (mask.defined() && (mask.dim() != 2 || mask.size(0) != ids.size(0) || mask.size(1) != past + ids.size(1)))
      detail::fail("GPT2: attention_mask must be [{}, {}] (cached + new positions), got {}", ids.size(0),
                   past + ids.size(1), detail::format_shape(mask.sizes()));
  }

  GPT2Config config_;
  bool sparse_embedding_grad_ = false;
};

/// Turns a model's sparse embedding gradient (GPT2Impl::set_sparse_embedding_grad) on for the guard's lifetime and
/// restores the previous setting; does nothing for a model without the setting.
template <class Model>
class SparseEmbeddingGrad {
 public:
  explicit SparseEmbeddingGrad(Model& model) : model_(model) {
    if constexpr (kHasSetting) {
      previous_ = model_.sparse_embedding_grad();
      model_.set_sparse_embedding_grad(true);
    }
  }
  ~SparseEmbeddingGrad() {
    if constexpr (kHasSetting) model_.set_sparse_embedding_grad(previous_);
  }
  SparseEmbeddingGrad(const SparseEmbeddingGrad&) = delete;
  SparseEmbeddingGrad& operator=(const SparseEmbeddingGrad&) = delete;

 private:
  static constexpr bool kHasSetting = requires(Model& m) {
    { m.sparse_embedding_grad() } -> std::convertible_to<bool>;
    m.set_sparse_embedding_grad(true);
  };
  Model& model_;
  bool previous_ = false;
};

/// Re-initialises `model` as PyTorch's word-language-model examples do (the setup of the training-transparency
/// experiments, docs/transparency.md): every Conv1D weight (a LoRA layer's base included, not its adapters) and the
/// token embedding uniform in [-bound, bound] (e.g. 0.1), biases zero, layernorms to identity; learned positions
/// uniform too, a sinusoidal table kept. Seed with torch::manual_seed for reproducible weights.
template <class Adapter>
void init_uniform(GPT2Impl<Adapter>& model, double bound) {
  if (!(bound > 0)) detail::fail("init_uniform: bound must be positive, got {}", bound);
  torch::NoGradGuard no_grad;
  for (auto& module : model.modules(/*include_self=*/false)) {
    if (auto* linear = dynamic_cast<Conv1DImpl*>(module.get())) {
      linear->weight.uniform_(-bound, bound);
      linear->bias.zero_();
    } else if (auto* lora = dynamic_cast<LoRAConv1DImpl*>(module.get())) {
      lora->weight.uniform_(-bound, bound);
      lora->bias.zero_();
    } else if (auto* ln = dynamic_cast<torch::nn::LayerNormImpl*>(module.get())) {
      ln->reset_parameters();
    }
  }
  model.transformer->wte->weight.uniform_(-bound, bound);
  if (!model.config().sinusoidal_positions) model.transformer->wpe->weight.uniform_(-bound, bound);
}

/// Module holder for GPT2Impl: `GPT2<> model(config);`, `auto model = GPT2<>::from_pretrained("models/gpt2");`.
template <class Adapter = NoAdapter>
class GPT2 : public torch::nn::ModuleHolder<GPT2Impl<Adapter>> {
 public:
  using Impl = GPT2Impl<Adapter>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  /// Loads a Hugging Face GPT-2 folder (config.json + model.safetensors) onto `options.device` in
  /// `options.dtype` (layernorms stay fp32).
  static GPT2 from_pretrained(const std::filesystem::path& dir, const LoadOptions& options = {});
  /// Writes config.json and model.safetensors (names as GPT2LMHeadModel saves them) atomically into `dir`.
  /// Adapters are not written (save them with save_adapters(), or merge_adapters() first to export the tuned
  /// weights as a plain GPT-2 folder).
  void save_pretrained(const std::filesystem::path& dir) const;
};

// ---- loading and saving ----

namespace detail {

/// True for tensors a GPT-2 checkpoint may carry that are not parameters: the causal-mask buffers of older
/// checkpoints and the tied lm_head.
inline bool is_ignorable_gpt2_tensor(const std::string& name) {
  auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return (name.rfind("h.", 0) == 0 && (ends_with(".attn.bias") || ends_with(".attn.masked_bias"))) ||
         name == "lm_head.weight";
}


}  // namespace detail

/// Copies the tensors of `file` into `model`'s parameters (converting dtype and device). Names may carry the
/// "transformer." prefix or not. Missing, unexpected or misshapen tensors are errors naming the file and tensor.
/// Adapter parameters (lora_A, lora_B) are not expected in the file: they keep their fresh values (load them with
/// load_adapters()).
template <class Adapter>
void load_gpt2_weights(GPT2Impl<Adapter>& model, const SafetensorsFile& file) {
  const std::string prefix = "transformer.";
  std::map<std::string, torch::Tensor> params;  // name without prefix -> parameter
  for (auto& item : model.named_parameters())
    if (item.key().rfind(prefix, 0) == 0 && !is_adapter_parameter(item.key()))
      params.emplace(item.key().substr(prefix.size()), item.value());
  const auto path = file.path().string();
  const auto& config = model.config();
  std::set<std::string> loaded;
  torch::NoGradGuard no_grad;
  for (const auto& info : file.tensors()) {
    std::string name = info.name.rfind(prefix, 0) == 0 ? info.name.substr(prefix.size()) : info.name;
    auto it = params.find(name);
    if (it == params.end()) {
      if (detail::is_ignorable_gpt2_tensor(name)) continue;
      detail::fail("safetensors: {}: unexpected tensor '{}' (not a parameter of GPT-2 with n_layer = {}; "
                   "---> HINT: does config.json belong to this checkpoint?)",
                   path, info.name, config.n_layer);
    }
    auto& param = it->second;
    if (param.sizes() != torch::IntArrayRef(info.shape))
      detail::fail("safetensors: {}: tensor '{}' has shape {}, config expects {}", path, info.name,
                   detail::format_shape(info.shape), detail::format_shape(param.sizes()));
    if (!loaded.insert(name).second)
      detail::fail("safetensors: {}: tensor '{}' appears both with and without the 'transformer.' prefix", path,
                   name);
    param.copy_(file.view(info.name));
  }
  for (const auto& [name, param] : params)
    if (!loaded.contains(name))
      detail::fail("safetensors: {}: missing tensor '{}' (expected shape {}); {} of {} parameters found", path, name,
                   detail::format_shape(param.sizes()), loaded.size(), params.size());
}

template <class Adapter>
GPT2<Adapter> GPT2<Adapter>::from_pretrained(const std::filesystem::path& dir, const LoadOptions& options) {
  auto config = GPT2Config::from_file(dir / "config.json");
  const auto weights = dir / "model.safetensors";
  if (!std::filesystem::exists(weights))
    detail::fail("GPT2: {}: no model.safetensors (---> HINT: convert a pytorch_model.bin with the safetensors "
                 "package, or save the model with safe_serialization=True)",
                 dir.string());
  SafetensorsFile file(weights);
  GPT2 model(config);
  model->place(options.device, options.dtype.value_or(torch::kFloat));
  load_gpt2_weights(*model, file);
  return model;
}

template <class Adapter>
void GPT2<Adapter>::save_pretrained(const std::filesystem::path& dir) const {
  std::filesystem::create_directories(dir);
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& item : (*this)->named_parameters())
    if (!is_adapter_parameter(item.key())) tensors.emplace(item.key(), item.value().detach());
  auto config = (*this)->config().to_json();
  const auto dtype = (*this)->dtype();
  config["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : "float32";
  save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", config.dump(2) + "\n");
}

}  // namespace rlhf
