#pragma once
/// @file GPT-2 hyperparameters, read from and written to Hugging Face's config.json.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>

namespace rlhf {

/// Hyperparameters of a GPT-2 model, with the names and defaults of Hugging Face's GPT2Config (gpt2-small).
struct GPT2Config {
  int64_t vocab_size = 50257;                 ///< tokens in the vocabulary, e.g. 50257
  int64_t n_positions = 1024;                 ///< longest sequence (learned position embeddings), e.g. 1024
  int64_t n_embd = 768;                       ///< width of the residual stream, e.g. 768
  int64_t n_layer = 12;                       ///< transformer blocks, e.g. 12
  int64_t n_head = 12;                        ///< attention heads per block; must divide n_embd, e.g. 12
  std::optional<int64_t> n_inner;             ///< MLP hidden width; unset means 4 * n_embd (3072)
  std::string activation_function = "gelu_new";  ///< gelu_new (= gelu_pytorch_tanh), gelu, gelu_fast or relu
  double layer_norm_epsilon = 1e-5;           ///< epsilon of every layernorm, e.g. 1e-5
  double embd_pdrop = 0.1;                    ///< dropout after the embeddings (training only), e.g. 0.1
  double attn_pdrop = 0.1;                    ///< dropout on attention probabilities (training only), e.g. 0.1
  double resid_pdrop = 0.1;                   ///< dropout before each residual add (training only), e.g. 0.1
  double initializer_range = 0.02;            ///< std of the normal initialisation of fresh weights, e.g. 0.02
  bool scale_attn_weights = true;             ///< divide attention scores by sqrt(d_head)
  bool scale_attn_by_inverse_layer_idx = false;  ///< also divide scores of block i by i + 1
  int64_t bos_token_id = 50256;               ///< beginning-of-sequence id, e.g. 50256 (<|endoftext|>)
  int64_t eos_token_id = 50256;               ///< end-of-sequence id, e.g. 50256 (<|endoftext|>)
  /// Fixed sinusoidal positions (Vaswani et al. 2017, arXiv 1706.03762) instead of learned ones: wpe holds the
  /// table sin(p / 10000^(2i/D)), cos(...) and does not train, so a saved folder is still an ordinary GPT-2
  /// checkpoint that computes the same function. Written to config.json as "sinusoidal_positions" only when on.
  bool sinusoidal_positions = false;
  /// Factor on the token embeddings before the positions are added (PyTorch's transformer tutorial uses
  /// sqrt(n_embd), e.g. 14.1 for width 200); the tied output projection stays unscaled. Must be positive and finite.
  /// Written to config.json as "embedding_scale" only when it is not 1. Hugging Face's GPT2LMHeadModel does not know
  /// the key (it keeps it as an attribute and computes without the factor), so such a folder is this library's only.
  double embedding_scale = 1.0;

  /// Width of one attention head (n_embd / n_head), e.g. 64.
  int64_t d_head() const { return n_embd / n_head; }
  /// Hidden width of the MLP, e.g. 3072.
  int64_t d_mlp() const { return n_inner.value_or(4 * n_embd); }

  /// Throws rlhf::Error naming the offending key when values are out of range or inconsistent.
  /// `source` names where the values came from (a file path), for the message.
  void validate(std::string_view source = "GPT2Config") const;

  /// Reads a Hugging Face GPT-2 config object. Keys the model uses are type-checked; generic Hugging Face keys that
  /// do not change the computation (architectures, task_specific_params, generation defaults, ...) are accepted and
  /// ignored; keys that would change the computation in ways this model does not implement, and unknown keys, are
  /// rejected with the key named.
  static GPT2Config from_json(const nlohmann::json& json, std::string_view source = "config.json");
  /// Reads `path` (a config.json file).
  static GPT2Config from_file(const std::filesystem::path& path);
  /// The config as Hugging Face writes it (model_type "gpt2", architectures ["GPT2LMHeadModel"]).
  nlohmann::json to_json() const;

  bool operator==(const GPT2Config&) const = default;
};

// ---- implementation ----

namespace detail {

/// Keys of Hugging Face's PretrainedConfig and GPT-2 config files that carry no meaning for the computation.
inline const std::set<std::string, std::less<>>& ignored_hf_config_keys() {
  static const std::set<std::string, std::less<>> keys = {
      "_name_or_path", "_commit_hash", "_num_labels", "_attn_implementation", "_attn_implementation_autoset",
      "architectures", "transformers_version", "torch_dtype", "use_cache", "output_past", "task_specific_params",
      "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
      "reorder_and_upcast_attn", "predict_special_tokens", "id2label", "label2id", "problem_type",
      "finetuning_task", "tokenizer_class", "prefix", "pad_token_id", "sep_token_id", "decoder_start_token_id",
      "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
      "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
      "tie_encoder_decoder", "gradient_checkpointing", "max_length", "min_length", "do_sample", "early_stopping",
      "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
      "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
      "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
      "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
      "begin_suppress_tokens", "dtype", "use_return_dict", "attn_implementation", "_attn_implementation_internal",
      "base_model_tp_plan", "base_model_pp_plan", "tp_plan", "pp_plan", "output_router_logits",
      "_output_attentions", "torch_dtype_autoset", "num_labels"};
  return keys;
}

inline int64_t config_int(const nlohmann::json& value, std::string_view key, std::string_view source, int64_t min) {
  if (!value.is_number_integer() || value.get<int64_t>() < min)
    fail("config: {}: '{}' must be an integer >= {}, got {}", source, key, min, value.dump());
  return value.get<int64_t>();
}

inline double config_number(const nlohmann::json& value, std::string_view key, std::string_view source) {
  if (!value.is_number()) fail("config: {}: '{}' must be a number, got {}", source, key, value.dump());
  return value.get<double>();
}

inline bool config_bool(const nlohmann::json& value, std::string_view key, std::string_view source) {
  if (!value.is_boolean()) fail("config: {}: '{}' must be true or false, got {}", source, key, value.dump());
  return value.get<bool>();
}

}  // namespace detail

inline void GPT2Config::validate(std::string_view source) const {
  auto positive = [&](int64_t v, std::string_view key) {
    if (v <= 0) detail::fail("config: {}: '{}' must be positive, got {}", source, key, v);
  };
  positive(vocab_size, "vocab_size");
  positive(n_positions, "n_positions");
  positive(n_embd, "n_embd");
  positive(n_layer, "n_layer");
  positive(n_head, "n_head");
  if (n_inner) positive(*n_inner, "n_inner");
  if (n_embd % n_head != 0)
    detail::fail("config: {}: 'n_embd' ({}) must be divisible by 'n_head' ({})", source, n_embd, n_head);
  static const std::set<std::string, std::less<>> activations = {"gelu_new", "gelu_pytorch_tanh", "gelu",
                                                                  "gelu_fast", "relu"};
  if (!activations.contains(activation_function))
    detail::fail("config: {}: 'activation_function' is '{}'; supported: gelu_new, gelu_pytorch_tanh, gelu, "
                 "gelu_fast, relu",
                 source, activation_function);
  if (!(layer_norm_epsilon > 0))
    detail::fail("config: {}: 'layer_norm_epsilon' must be positive, got {}", source, layer_norm_epsilon);
  for (auto [value, key] : {std::pair{embd_pdrop, "embd_pdrop"}, std::pair{attn_pdrop, "attn_pdrop"},
                            std::pair{resid_pdrop, "resid_pdrop"}})
    if (!(value >= 0 && value < 1)) detail::fail("config: {}: '{}' must be in [0, 1), got {}", source, key, value);
  if (!(initializer_range >= 0))
    detail::fail("config: {}: 'initializer_range' must be >= 0, got {}", source, initializer_range);
  // bos/eos ids are metadata: tiny test configs often keep GPT-2's 50256 with a small vocabulary, so only their
  // sign is checked here; the sampler checks an EOS id it is asked to use.
  for (auto [value, key] : {std::pair{bos_token_id, "bos_token_id"}, std::pair{eos_token_id, "eos_token_id"}})
    if (value < 0) detail::fail("config: {}: '{}' must be >= 0, got {}", source, key, value);
  if (sinusoidal_positions && n_embd % 2 != 0)
    detail::fail("config: {}: 'sinusoidal_positions' needs an even 'n_embd' (sin and cos pairs), got {}", source,
                 n_embd);
  if (!(std::isfinite(embedding_scale) && embedding_scale > 0))
    detail::fail("config: {}: 'embedding_scale' must be a positive finite number, got {}", source, embedding_scale);
}

inline GPT2Config GPT2Config::from_json(const nlohmann::json& json, std::string_view source) {
  using detail::config_bool;
  using detail::config_int;
  using detail::config_number;
  if (!json.is_object()) detail::fail("config: {}: expected a JSON object, got {}", source, json.type_name());
  GPT2Config c;
  std::optional<int64_t> n_ctx;
  for (const auto& [key, value] : json.items()) {
    if (key == "vocab_size") c.vocab_size = config_int(value, key, source, 1);
    else if (key == "n_positions") c.n_positions = config_int(value, key, source, 1);
    else if (key == "n_ctx") n_ctx = config_int(value, key, source, 1);
    else if (key == "n_embd") c.n_embd = config_int(value, key, source, 1);
    else if (key == "n_layer") c.n_layer = config_int(value, key, source, 1);
    else if (key == "n_head") c.n_head = config_int(value, key, source, 1);
    else if (key == "n_inner") c.n_inner = value.is_null() ? std::nullopt
                                                           : std::optional(config_int(value, key, source, 1));
    else if (key == "activation_function") {
      if (!value.is_string())
        detail::fail("config: {}: 'activation_function' must be a string, got {}", source, value.dump());
      c.activation_function = value.get<std::string>();
    } else if (key == "layer_norm_epsilon") c.layer_norm_epsilon = config_number(value, key, source);
    else if (key == "embd_pdrop") c.embd_pdrop = config_number(value, key, source);
    else if (key == "attn_pdrop") c.attn_pdrop = config_number(value, key, source);
    else if (key == "resid_pdrop") c.resid_pdrop = config_number(value, key, source);
    else if (key == "initializer_range") c.initializer_range = config_number(value, key, source);
    else if (key == "scale_attn_weights") c.scale_attn_weights = config_bool(value, key, source);
    else if (key == "scale_attn_by_inverse_layer_idx")
      c.scale_attn_by_inverse_layer_idx = config_bool(value, key, source);
    else if (key == "bos_token_id") c.bos_token_id = config_int(value, key, source, 0);
    else if (key == "eos_token_id") c.eos_token_id = config_int(value, key, source, 0);
    else if (key == "sinusoidal_positions") c.sinusoidal_positions = config_bool(value, key, source);
    else if (key == "embedding_scale") c.embedding_scale = config_number(value, key, source);
    else if (key == "model_type") {
      if (value != "gpt2")
        detail::fail("config: {}: 'model_type' is {}, expected \"gpt2\"", source, value.dump());
    } else if (key == "tie_word_embeddings") {
      if (!config_bool(value, key, source))
        detail::fail("config: {}: 'tie_word_embeddings' is false; GPT-2 here ties lm_head to wte", source);
    } else if (key == "add_cross_attention") {
      if (config_bool(value, key, source))
        detail::fail("config: {}: 'add_cross_attention' is true; cross-attention is not supported", source);
    } else if (key == "n_special") {
      if (config_int(value, key, source, 0) != 0)
        detail::fail("config: {}: 'n_special' must be 0 (extra special-token embeddings are not supported)",
                     source);
    } else if (!detail::ignored_hf_config_keys().contains(key)) {
      detail::fail("config: {}: unknown key '{}' (a GPT-2 config has n_layer, n_head, n_embd, n_positions, "
                   "vocab_size, layer_norm_epsilon, activation_function, *_pdrop, ...)",
                   source, key);
    }
  }
  if (n_ctx && *n_ctx != c.n_positions)
    detail::fail("config: {}: 'n_ctx' ({}) differs from 'n_positions' ({})", source, *n_ctx, c.n_positions);
  c.validate(source);
  return c;
}

inline GPT2Config GPT2Config::from_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) detail::fail("config: {}: cannot open (expected a Hugging Face config.json)", path.string());
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    detail::fail("config: {}: not valid JSON: {}", path.string(), e.what());
  }
  return from_json(json, path.string());
}

inline nlohmann::json GPT2Config::to_json() const {
  nlohmann::json j = {{"model_type", "gpt2"},
                      {"architectures", {"GPT2LMHeadModel"}},
                      {"vocab_size", vocab_size},
                      {"n_positions", n_positions},
                      {"n_ctx", n_positions},
                      {"n_embd", n_embd},
                      {"n_layer", n_layer},
                      {"n_head", n_head},
                      {"n_inner", nullptr},
                      {"activation_function", activation_function},
                      {"layer_norm_epsilon", layer_norm_epsilon},
                      {"embd_pdrop", embd_pdrop},
                      {"attn_pdrop", attn_pdrop},
                      {"resid_pdrop", resid_pdrop},
                      {"initializer_range", initializer_range},
                      {"scale_attn_weights", scale_attn_weights},
                      {"scale_attn_by_inverse_layer_idx", scale_attn_by_inverse_layer_idx},
                      {"bos_token_id", bos_token_id},
                      {"eos_token_id", eos_token_id},
                      {"tie_word_embeddings", true}};
  if (n_inner) j["n_inner"] = *n_inner;
  if (sinusoidal_positions) j["sinusoidal_positions"] = true;
  if (embedding_scale != 1.0) j["embedding_scale"] = embedding_scale;
  return j;
}

}  // namespace rlhf
