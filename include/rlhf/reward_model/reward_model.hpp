#pragma once
/// @file A learned reward model (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155): a
/// GPT-2 transformer and a scalar head read at the last real token of each row, with its outputs normalised to mean
/// 0 / std 1 on a reference set; saving and loading it as a folder; LearnedReward, which plugs it into PPOTrainer.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/model/actor_critic.hpp>
#include <rlhf/model/gpt2.hpp>
#include <rlhf/rewards/reward.hpp>
#include <rlhf/tokenizer/batch_encode.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>

namespace rlhf {

// ---- reading the last real token ----

/// Index [B] (int64) of the last real token of each row: the last position where `attention_mask` [B, T] is
/// nonzero. Works for right padding, left padding and rollouts (left-padded prompt, samples, padding after EOS).
/// An undefined mask means no padding (every row ends at T - 1); a row without any real token is an error.
inline torch::Tensor last_token_index(const torch::Tensor& attention_mask, int64_t batch, int64_t length,
                                      torch::Device device) {
  if (!attention_mask.defined())
    return torch::full({batch}, length - 1, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto real = attention_mask.ne(0);  // [B, T]
  auto has_real = real.any(1);       // [B]
  if (!has_real.all().item<bool>()) {
    const int64_t row = has_real.logical_not().nonzero()[0][0].item<int64_t>();
    detail::fail("reward model: row {} of the attention mask has no real token (expected at least one 1 per row)",
                 row);
  }
  auto positions = torch::arange(length, torch::TensorOptions().dtype(torch::kLong).device(real.device()));  // [T]
  return (positions.unsqueeze(0) * real.to(torch::kLong)).amax(1);  // [B]
}

// ---- the model ----

/// A reward model: `Base` (e.g. GPT2<>, or GPT2<LoRA<8>>) produces the final-layernorm residual [B, T, D] and the
/// scalar head `score` (Linear(D, 1)) reads it at the last real token of each row, so one sequence gets one score.
/// `raw()` is the head's output; `forward()` normalises it with a stored mean and std ((raw - mean) / std, the
/// identity until set_normalisation() or normalise_on() sets them), as the seed normalises its reward model so
/// that reference samples score mean 0, std 1.
///
/// Start it from the SFT model (the model PPO will fine-tune), as the seed and Ouyang et al. do: it then reads text
/// the way the policy writes it. RewardModel<>::from_copy(sft) copies the weights; passing the policy's own holder
/// to the constructor would share them.
template <class Base = GPT2<>>
class RewardModelImpl : public torch::nn::Module {
  static_assert(BaseModel<Base>, "RewardModel: the base model slot needs forward(ids, mask, KVCache*), "
                                 "logits(hidden), config() with n_embd/vocab_size, new_cache(), from_pretrained()");

 public:
  using BaseType = Base;  ///< the transformer type

  /// Wraps `base_model` (its weights are shared with the caller's holder) and adds a fresh head on its device.
  explicit RewardModelImpl(Base base_model) : base(std::move(base_model)) {
    const int64_t d = base->config().n_embd;
    register_module("base", base.ptr());
    score = register_module("score", torch::nn::Linear(d, 1));
    const auto fp32 = torch::TensorOptions().dtype(torch::kFloat).device(base->device());
    norm_mean = register_buffer("norm_mean", torch::zeros({}, fp32));  // [] fp32
    norm_std = register_buffer("norm_std", torch::ones({}, fp32));     // [] fp32
    score->to(base->device());
    reset_head();
  }

  /// Re-initialises the head: weight N(0, 1 / (D + 1)) (std 1 / sqrt(D + 1), as the seed and TRL do), bias 0.
  /// Leaves the transformer and the normalisation as they are.
  void reset_head() {
    torch::NoGradGuard no_grad;
    const double d = static_cast<double>(base->config().n_embd);
    score->weight.normal_(0.0, 1.0 / std::sqrt(d + 1.0));
    score->bias.zero_();
  }

  /// Unnormalised scores [B] (fp32) of `ids` [B, T] (int64) with `mask` [B, T] (1 = real token; undefined = no
  /// padding): the head at the last real token of each row. Positions come from the mask, so left- and
  /// right-padded rows score as their unpadded selves.
  torch::Tensor raw(const torch::Tensor& ids, const torch::Tensor& mask = {}) {
    if (ids.dim() != 2) detail::fail("reward model: ids must be [batch, seq], got {} dims", ids.dim());
    auto hidden = base->forward(ids, mask);  // [B, T, D] fp32
    const int64_t b = ids.size(0), t = ids.size(1);
    auto last = last_token_index(mask, b, t, hidden.device());  // [B]
    auto picked = hidden.gather(1, last.view({b, 1, 1}).expand({b, 1, hidden.size(2)})).squeeze(1);  // [B, D]
    return score(picked.to(score->weight.scalar_type())).squeeze(-1).to(torch::kFloat);  // [B]
  }

  /// Normalised scores [B] (fp32): (raw(ids, mask) - mean) / std.
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask = {}) {
    return (raw(ids, mask) - norm_mean) / norm_std;
  }

  /// Sets the normalisation forward() applies; `std` must be positive and both finite.
  void set_normalisation(double mean, double std) {
    if (!std::isfinite(mean) || !std::isfinite(std) || !(std > 0))
      detail::fail("reward model: normalisation needs a finite mean and a positive finite std, got mean {} std {}",
                   mean, std);
    torch::NoGradGuard no_grad;
    norm_mean.fill_(mean);
    norm_std.fill_(std);
  }

  /// The normalisation forward() applies, as {mean, std} ({0, 1} until set).
  std::pair<double, double> normalisation() const {
    return {norm_mean.item<double>(), norm_std.item<double>()};
  }

  /// Sets the normalisation so that the reference set `batches` (pairs of ids [B, T] and mask [B, T]; the rows of
  /// every batch together) scores mean 0 and std 1 (torch's unbiased std) under forward(). Runs without gradients
  /// in eval mode (restoring the training flag) under `precision`. Needs at least two rows in all; returns
  /// {mean, std} of the raw scores.
  std::pair<double, double> normalise_on(const std::vector<std::pair<torch::Tensor, torch::Tensor>>& batches,
                                         Precision precision = Precision::automatic) {
    std::vector<torch::Tensor> scores;
    {
      torch::NoGradGuard no_grad;
      const bool was_training = is_training();
      eval();
      AutocastScope autocast(precision, base->device());
      const auto device = base->device();
      for (const auto& [ids, mask] : batches)
        scores.push_back(raw(ids.to(device), mask.defined() ? mask.to(device) : mask));
      if (was_training) train();
    }
    const int64_t n = scores.empty() ? 0 : torch::cat(scores).size(0);
    if (n < 2) detail::fail("reward model: normalise_on needs at least 2 reference rows, got {}", n);
    auto all = torch::cat(scores).to(torch::kDouble);  // [N]
    const double mean = all.mean().item<double>(), std = all.std().item<double>();
    if (!(std > 0))
      detail::fail("reward model: normalise_on: the {} reference rows all score {} (std 0) ---> HINT: use a varied "
                   "reference set, e.g. samples of the policy PPO starts from",
                   n, mean);
    set_normalisation(mean, std);
    return {mean, std};
  }

  /// As above for one reference batch.
  std::pair<double, double> normalise_on(const torch::Tensor& ids, const torch::Tensor& mask,
                                         Precision precision = Precision::automatic) {
    return normalise_on({{ids, mask}}, precision);
  }

  /// The device of the weights.
  torch::Device device() const { return base->device(); }

  /// Moves the model to `device`: the transformer in `dtype` (layernorms stay fp32, see GPT2Impl::place), the head
  /// and the normalisation in fp32.
  void place(torch::Device device, torch::ScalarType dtype) {
    base->place(device, dtype);
    score->to(device, torch::kFloat);
    // set_data keeps the members and the registered buffers the same tensors
    norm_mean.set_data(norm_mean.to(device));
    norm_std.set_data(norm_std.to(device));
  }

  Base base;                           ///< the transformer
  torch::nn::Linear score{nullptr};    ///< [D] -> [1], read at the last real token
  torch::Tensor norm_mean;             ///< [] fp32: raw-score mean subtracted by forward()
  torch::Tensor norm_std;              ///< [] fp32: raw-score std divided out by forward()
};

/// Module holder for RewardModelImpl: `RewardModel<> rm(GPT2<>(config));`, `RewardModel<>::from_copy(sft)`,
/// `RewardModel<>::from_pretrained("runs/rm")`.
///
/// The folder format (save_pretrained / from_pretrained), every file written atomically, reward_model.json last:
/// - config.json + model.safetensors: the transformer as GPT2::save_pretrained writes it (a GPT-2 folder that
///   Hugging Face and GPT2<>::from_pretrained read; adapters are not merged in);
/// - adapter_model.safetensors + adapter_config.json: the LoRA adapters (save_adapters), when the base has them;
/// - reward_head.safetensors: "score.weight" [1, D] and "score.bias" [1], fp32;
/// - reward_model.json: {"format": 1, "normalisation": {"mean": m, "std": s}}.
template <class Base = GPT2<>>
class RewardModel : public torch::nn::ModuleHolder<RewardModelImpl<Base>> {
 public:
  using Impl = RewardModelImpl<Base>;
  using torch::nn::ModuleHolder<Impl>::ModuleHolder;

  /// Format version written to reward_model.json.
  static constexpr int kFormat = 1;

  /// A reward model whose transformer starts as a copy of `sft` (the SFT / pretrained model: same config, device
  /// and dtype; weights copied, not shared) with a fresh head.
  static RewardModel from_copy(const Base& sft) {
    Base copy(sft->config());
    copy->place(sft->device(), sft->dtype());
    copy_parameters(*sft.ptr(), *copy);
    return RewardModel(std::move(copy));
  }

  /// A reward model on a pretrained (or SFT) GPT-2 folder (config.json + model.safetensors) with a fresh head.
  static RewardModel from_base_pretrained(const std::filesystem::path& dir, const LoadOptions& options = {}) {
    return RewardModel(Base::from_pretrained(dir, options));
  }

  /// Loads a folder written by save_pretrained(). Errors name the file and the field: a missing file, malformed
  /// reward_model.json, a head whose shape does not match config.json's n_embd.
  static RewardModel from_pretrained(const std::filesystem::path& dir, const LoadOptions& options = {});

  /// Writes the folder described above into `dir` (created if needed).
  void save_pretrained(const std::filesystem::path& dir) const;
};

namespace detail {

/// The normalisation {mean, std} stored in `path` (reward_model.json), with errors naming the file and field.
inline std::pair<double, double> read_reward_model_json(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path))
    fail("RewardModel: {}: no such file ---> HINT: is this a plain GPT-2 folder? Build a fresh head on it with "
         "RewardModel<>::from_base_pretrained()",
         path.string());
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    fail("RewardModel: {}: invalid JSON: {}", path.string(), e.what());
  }
  if (!json.is_object()) fail("RewardModel: {}: expected a JSON object, got {}", path.string(), json.type_name());
  if (!json.contains("format") || !json["format"].is_number_integer())
    fail("RewardModel: {}: field 'format': expected an integer", path.string());
  if (json["format"].get<int64_t>() != 1)
    fail("RewardModel: {}: field 'format' is {}, this library reads format 1", path.string(),
         json["format"].get<int64_t>());
  if (!json.contains("normalisation") || !json["normalisation"].is_object())
    fail("RewardModel: {}: field 'normalisation': expected an object {{\"mean\": number, \"std\": number}}",
         path.string());
  const auto& norm = json["normalisation"];
  for (const char* key : {"mean", "std"})
    if (!norm.contains(key) || !norm[key].is_number())
      fail("RewardModel: {}: field 'normalisation.{}': expected a number", path.string(), key);
  const double mean = norm["mean"].get<double>(), std = norm["std"].get<double>();
  if (!std::isfinite(mean) || !std::isfinite(std) || !(std > 0))
    fail("RewardModel: {}: field 'normalisation.std' must be positive (and both finite), got mean {} std {}",
         path.string(), mean, std);
  return {mean, std};
}

}  // namespace detail

template <class Base>
RewardModel<Base> RewardModel<Base>::from_pretrained(const std::filesystem::path& dir, const LoadOptions& options) {
  const auto [mean, std] = detail::read_reward_model_json(dir / "reward_model.json");
  const auto head_path = dir / "reward_head.safetensors";
  if (!std::filesystem::exists(head_path))
    detail::fail("RewardModel: {}: no such file (the reward head: score.weight [1, n_embd], score.bias [1])",
                 head_path.string());
  RewardModel model(Base::from_pretrained(dir, options));
  if constexpr (has_adapters_v<Base>) load_adapters(*model->base, dir);
  const int64_t d = model->base->config().n_embd;
  SafetensorsFile file(head_path);
  const std::map<std::string, std::vector<int64_t>> expected = {{"score.weight", {1, d}}, {"score.bias", {1}}};
  for (const auto& info : file.tensors())
    if (!expected.contains(info.name))
      detail::fail("RewardModel: {}: unexpected tensor '{}' (expected score.weight and score.bias)",
                   head_path.string(), info.name);
  for (const auto& [name, shape] : expected) {
    const TensorInfo* info = file.find(name);
    if (!info)
      detail::fail("RewardModel: {}: missing tensor '{}' (expected shape {})", head_path.string(), name,
                   detail::format_shape(shape));
    if (info->shape != shape)
      detail::fail("RewardModel: {}: tensor '{}' has shape {}, config.json's n_embd = {} expects {} ---> HINT: the "
                   "head and config.json come from different models",
                   head_path.string(), name, detail::format_shape(info->shape), d, detail::format_shape(shape));
  }
  {
    torch::NoGradGuard no_grad;
    model->score->weight.copy_(file.view("score.weight"));
    model->score->bias.copy_(file.view("score.bias"));
  }
  model->set_normalisation(mean, std);
  return model;
}

template <class Base>
void RewardModel<Base>::save_pretrained(const std::filesystem::path& dir) const {
  std::filesystem::create_directories(dir);
  const auto& impl = **this;
  impl.base.save_pretrained(dir);
  if constexpr (has_adapters_v<Base>) save_adapters(*impl.base.ptr(), dir);
  save_safetensors(dir / "reward_head.safetensors",
                   {{"score.weight", impl.score->weight.detach().to(torch::kCPU, torch::kFloat)},
                    {"score.bias", impl.score->bias.detach().to(torch::kCPU, torch::kFloat)}},
                   {{"format", "pt"}});
  const auto [mean, std] = impl.normalisation();
  nlohmann::ordered_json json = {{"format", kFormat}, {"normalisation", {{"mean", mean}, {"std", std}}}};
  write_file_atomic(dir / "reward_model.json", json.dump(2) + "\n");
}

// ---- encoding texts for a reward model ----

/// Encodes `texts` for a reward model: each row `<|endoftext|>` + the text's tokens (with `prepend_bos`, as the
/// training data and PPO prompts start), right-padded with eos_id() (mask 0). With `max_length` > 0 a longer row
/// keeps its last `max_length` tokens (the score reads the end). With `allow_special`, "<|endoftext|>" in a text
/// becomes the EOS id (as in decoded PPO samples that stopped at EOS). Returns ids and mask [B, T] int64 on the CPU.
inline BatchEncoding encode_for_reward(const GPT2Tokenizer& tokenizer, const std::vector<std::string>& texts,
                                       bool prepend_bos = true, int64_t max_length = 0, bool allow_special = false) {
  if (texts.empty()) detail::fail("encode_for_reward: empty batch (expected at least one text)");
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(texts.size());
  size_t width = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    std::vector<int64_t> ids;
    if (prepend_bos) ids.push_back(tokenizer.eos_id());
    auto encoded = tokenizer.encode(texts[i], allow_special);
    ids.insert(ids.end(), encoded.begin(), encoded.end());
    if (ids.empty())
      detail::fail("encode_for_reward: text {} encodes to no tokens ---> HINT: pass prepend_bos = true", i);
    if (max_length > 0 && static_cast<int64_t>(ids.size()) > max_length)
      ids.erase(ids.begin(), ids.end() - max_length);
    width = std::max(width, ids.size());
    rows.push_back(std::move(ids));
  }
  const auto b = static_cast<int64_t>(rows.size()), t = static_cast<int64_t>(width);
  auto ids = torch::full({b, t}, tokenizer.eos_id(), torch::kLong);  // [B, T]
  auto mask = torch::zeros({b, t}, torch::kLong);                     // [B, T]
  auto ids_a = ids.accessor<int64_t, 2>();
  auto mask_a = mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < b; ++r)
    for (size_t j = 0; j < rows[r].size(); ++j) {
      ids_a[r][static_cast<int64_t>(j)] = rows[r][j];
      mask_a[r][static_cast<int64_t>(j)] = 1;
    }
  return {ids, mask};
}

// ---- plugging into PPO ----

/// How LearnedReward scores.
struct LearnedRewardOptions {
  Precision precision = Precision::automatic;  ///< forwards under bf16 autocast when bf16 (auto: where native)
  bool normalised = true;                 ///< forward() (normalised) scores; false = raw()
  int64_t chunk_rows = 0;                 ///< rows per forward, e.g. 16; 0 = the whole rollout at once
};

/// A Reward (see rewards/reward.hpp) from a learned reward model, for PPOTrainer: scores each rollout without
/// gradients, in eval mode (the model's training flag is restored), under the configured precision.
/// - Built without a tokenizer, the reward model shares the policy's tokenizer: it scores the rollout ids directly,
///   with mask [prompt part of attention_mask, generated_mask], so the tokens after EOS are ignored.
/// - Built with its own GPT2Tokenizer, it re-encodes prompt + completion text with encode_for_reward()
///   (BOS-prefixed, right-padded, "<|endoftext|>" read as the EOS id, cut to the model's n_positions from the
///   left).
/// Scores come back as a [B] fp32 CPU tensor, checked with check_scores().
template <class Base = GPT2<>>
class LearnedReward {
 public:
  /// Scores rollout ids directly (the reward model uses the policy's tokenizer).
  explicit LearnedReward(RewardModel<Base> model, LearnedRewardOptions options = {})
      : model_(std::move(model)), options_(options) {}

  /// Re-encodes the rollout's texts with the reward model's own `tokenizer`.
  LearnedReward(RewardModel<Base> model, GPT2Tokenizer tokenizer, LearnedRewardOptions options = {})
      : model_(std::move(model)), tokenizer_(std::make_shared<GPT2Tokenizer>(std::move(tokenizer))),
        options_(options) {}

  /// Scores [B] (fp32, CPU) of the rollout's samples.
  torch::Tensor operator()(const Rollout& rollout) {
    const int64_t batch = rollout.size();
    if (tokenizer_) {
      if (static_cast<int64_t>(rollout.prompts.size()) != batch ||
          static_cast<int64_t>(rollout.completions.size()) != batch)
        detail::fail("LearnedReward: the rollout has {} rows but {} prompts and {} completions (expected {} of each)",
                     batch, rollout.prompts.size(), rollout.completions.size(), batch);
      std::vector<std::string> texts;
      texts.reserve(batch);
      for (int64_t i = 0; i < batch; ++i) texts.push_back(rollout.prompts[i] + rollout.completions[i]);
      return score_texts(texts);
    }
    const int64_t p = rollout.prompt_length;
    if (rollout.generated_mask.size(0) != batch || rollout.ids.size(1) != p + rollout.generated_mask.size(1))
      detail::fail("LearnedReward: rollout ids {} do not match prompt_length {} + generated_mask {}",
                   detail::format_shape(rollout.ids.sizes()), p, detail::format_shape(rollout.generated_mask.sizes()));
    const int64_t vocab = model_->base->config().vocab_size;
    if (rollout.ids.max().item<int64_t>() >= vocab)
      detail::fail("LearnedReward: the rollout holds token id {} but the reward model's vocab_size is {} ---> HINT: "
                   "a reward model with another tokenizer needs it: LearnedReward(model, tokenizer)",
                   rollout.ids.max().item<int64_t>(), vocab);
    auto mask = torch::cat({rollout.attention_mask.narrow(1, 0, p).to(torch::kLong),
                            rollout.generated_mask.to(rollout.attention_mask.device(), torch::kLong)},
                           1);  // [B, P + G]
    return check_scores(score_ids(rollout.ids, mask), batch);
  }

  /// Scores [B] (fp32, CPU) of whole texts (prompt + completion), encoded with the reward model's tokenizer.
  torch::Tensor score_texts(const std::vector<std::string>& texts) {
    if (!tokenizer_)
      detail::fail("LearnedReward::score_texts: this reward has no tokenizer ---> HINT: construct it with "
                   "LearnedReward(model, tokenizer)");
    auto enc = encode_for_reward(*tokenizer_, texts, true, model_->base->config().n_positions, true);
    return check_scores(score_ids(enc.input_ids, enc.attention_mask), static_cast<int64_t>(texts.size()));
  }

  /// Scores [B] (fp32, CPU) of token ids [B, T] with mask [B, T], without gradients, in eval mode.
  torch::Tensor score_ids(const torch::Tensor& ids, const torch::Tensor& mask) {
    torch::NoGradGuard no_grad;
    const bool was_training = model_->is_training();
    model_->eval();
    const auto device = model_->device();
    const int64_t b = ids.size(0);
    const int64_t chunk = options_.chunk_rows > 0 ? options_.chunk_rows : b;
    std::vector<torch::Tensor> parts;
    {
      AutocastScope autocast(options_.precision, device);
      for (int64_t start = 0; start < b; start += chunk) {
        const int64_t n = std::min(chunk, b - start);
        auto i = ids.narrow(0, start, n).to(device), m = mask.narrow(0, start, n).to(device);
        parts.push_back(options_.normalised ? model_->forward(i, m) : model_->raw(i, m));
      }
    }
    if (was_training) model_->train();
    return torch::cat(parts).to(torch::kCPU, torch::kFloat);  // [B]
  }

  /// The wrapped model.
  RewardModel<Base>& model() { return model_; }
  const LearnedRewardOptions& options() const { return options_; }

 private:
  RewardModel<Base> model_;
  std::shared_ptr<GPT2Tokenizer> tokenizer_;  // null: shares the policy's tokenizer
  LearnedRewardOptions options_;
};

}  // namespace rlhf
