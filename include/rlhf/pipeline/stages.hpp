#pragma once
/// @file The stages of the RLHF recipe as runs: pretraining, supervised fine-tuning, reward-model training and PPO,
/// each configured by a struct that config files bind to (visit_fields), each writing a run folder (run/run_dir.hpp)
/// and resumable; plus sampling from a model and evaluation. The `rlhf` command's subcommands call these.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/config/config_file.hpp>
#include <rlhf/config/library_fields.hpp>
#include <rlhf/data/collate.hpp>
#include <rlhf/data/corpus.hpp>
#include <rlhf/data/datasets.hpp>
#include <rlhf/data/filters.hpp>
#include <rlhf/data/sampler.hpp>
#include <rlhf/generation/sampling.hpp>
#include <rlhf/model/actor_critic.hpp>
#include <rlhf/pipeline/loop.hpp>
#include <rlhf/pipeline/model_spec.hpp>
#include <rlhf/ppo/trainer.hpp>
#include <rlhf/reward_model/reward_model.hpp>
#include <rlhf/reward_model/reward_trainer.hpp>
#include <rlhf/rewards/lexicon.hpp>
#include <rlhf/run/run_dir.hpp>
#include <rlhf/tokenizer/batch_encode.hpp>
#include <rlhf/train/lm_trainer.hpp>

namespace rlhf::pipeline {

// ---- settings shared by the stages ----

/// How often a run logs, evaluates, samples and checkpoints, in steps (PPO: phases); 0 = never (a checkpoint is
/// still written at the end and on Ctrl-C).
struct Schedule {
  int64_t log_every = 10;         ///< metrics.jsonl and TensorBoard, e.g. 10
  int64_t eval_every = 100;       ///< held-out evaluation, e.g. 100
  int64_t sample_every = 100;     ///< samples.jsonl, e.g. 100
  int64_t checkpoint_every = 100; ///< checkpoints/step-N, e.g. 100
  int64_t keep_checkpoints = 2;   ///< checkpoints kept, e.g. 2 (0 = all)
  int64_t stop_after = 0;         ///< end this session after so many steps with a checkpoint (resume continues)
};

template <class V>
void visit_fields(ModelShape& c, V&& v) {
  v("n_layer", c.n_layer, "transformer blocks of a fresh model");
  v("n_head", c.n_head, "attention heads of a fresh model");
  v("n_embd", c.n_embd, "width of a fresh model's residual stream");
  v("n_positions", c.n_positions, "longest sequence of a fresh model");
  v("dropout", c.dropout, "embedding, attention and residual dropout of a fresh model while training");
}

template <class V>
void visit_fields(ModelSpec& c, V&& v) {
  v("path", c.path, "Hugging Face GPT-2 folder (config.json + model.safetensors); empty = a fresh model");
  v("tokenizer", c.tokenizer, "tokenizer folder; empty = the model folder, or byte-level for a fresh model");
  v("shape", c.shape);
  v("init_seed", c.init_seed, "seed of a fresh model's weights");
  v("device", c.device, "cpu, cuda, cuda:1, ...");
  v("dtype", c.dtype, "weights' dtype: float32 or bfloat16");
}

template <class V>
void visit_fields(Schedule& c, V&& v) {
  v("log_every", c.log_every, "steps between metric lines (metrics.jsonl, TensorBoard)");
  v("eval_every", c.eval_every, "steps between held-out evaluations");
  v("sample_every", c.sample_every, "steps between samples written to samples.jsonl");
  v("checkpoint_every", c.checkpoint_every, "steps between checkpoints");
  v("keep_checkpoints", c.keep_checkpoints, "checkpoints kept (0 = all)");
  v("stop_after", c.stop_after, "end this session after so many steps with a checkpoint (0 = run to the end)");
}

}  // namespace rlhf::pipeline

namespace rlhf {

template <class V>
void visit_fields(LMTrainConfig& c, V&& v) {
  v("seed", c.seed, "seeds dropout");
  v("total_steps", c.total_steps, "optimiser steps of the run");
  v("batch_size", c.batch_size, "sequences per step");
  v("lr", c.lr, "peak learning rate");
  v("weight_decay", c.weight_decay, "AdamW weight decay");
  v("eps", c.eps, "AdamW epsilon");
  v("warmup_steps", c.warmup_steps, "steps of linear warmup");
  v("final_scale", c.final_scale, "LR multiplier reached at the last step");
  v("max_grad_norm", c.max_grad_norm, "gradient-norm clip (0 = off)");
  v("layer_lr_decay", c.layer_lr_decay, "per-layer learning-rate decay (1 = one rate)");
  v("freeze", c.freeze);
  v("precision", c.precision, "fp32, bf16 (autocast) or auto (bf16 where native)");
  v("train_dropout", c.train_dropout, "dropout on in training steps");
  v("loss_chunk_rows", c.loss_chunk_rows, "target rows per logits chunk (0 = all at once)");
}

template <class V>
void visit_fields(RewardTrainConfig& c, V&& v) {
  v("seed", c.seed, "seeds dropout");
  v("total_steps", c.total_steps, "optimiser steps of the run");
  v("lr", c.lr, "peak learning rate of the transformer");
  v("head_lr", c.head_lr, "peak learning rate of the score head");
  v("weight_decay", c.weight_decay, "AdamW weight decay");
  v("warmup_steps", c.warmup_steps, "steps of linear warmup");
  v("final_scale", c.final_scale, "LR multiplier reached at the last step");
  v("max_grad_norm", c.max_grad_norm, "gradient-norm clip (0 = off)");
  v("layer_lr_decay", c.layer_lr_decay, "per-layer learning-rate decay (1 = one rate)");
  v("freeze", c.freeze);
  v("precision", c.precision, "fp32, bf16 (autocast) or auto (bf16 where native)");
  v("train_dropout", c.train_dropout, "dropout on in training steps");
}

namespace data {
template <class V>
void visit_fields(LengthFilter& c, V&& v) {
  v("min_tokens", c.min_tokens, "fewest tokens kept (0 = no lower bound)");
  v("max_tokens", c.max_tokens, "most tokens kept (0 = no upper bound)");
}
}  // namespace data

}  // namespace rlhf

namespace rlhf::pipeline {

namespace detail {

/// Numbers of a stats JSON without its arrays (samples) and without "step" / "time" (a metrics line has its own),
/// for metrics.
inline nlohmann::json numbers_only(const nlohmann::json& stats) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [key, value] : stats.items())
    if ((value.is_number() || value.is_boolean()) && key != "step" && key != "time") out[key] = value;
  return out;
}

/// `text` with every invalid UTF-8 sequence replaced by U+FFFD, so it can go into JSON logs (a small model's samples
/// are arbitrary bytes).
inline std::string valid_utf8(const std::string& text) {
  using json = nlohmann::json;
  return json::parse(json(text).dump(-1, ' ', false, json::error_handler_t::replace)).get<std::string>();
}

/// The indices [0, n) split into training and held-out by a seeded shuffle: the held-out part is ceil(fraction x n)
/// items (at least one when fraction > 0), the training part the rest (never empty).
inline std::pair<std::vector<size_t>, std::vector<size_t>> split_indices(size_t n, double fraction, uint64_t seed,
                                                                         const std::string& what) {
  if (!(fraction >= 0 && fraction < 1)) rlhf::detail::fail("{}: held_out must be in [0, 1), got {}", what, fraction);
  data::EpochSampler shuffle(n, seed);
  auto order = shuffle.next(n);
  size_t held = fraction > 0 ? std::max<size_t>(1, static_cast<size_t>(std::ceil(fraction * n))) : 0;
  if (held >= n)
    rlhf::detail::fail("{}: {} items are too few to hold out {} for evaluation ---> HINT: add data or set held_out "
                       "= 0",
                       what, n, held);
  std::vector<size_t> eval(order.end() - static_cast<std::ptrdiff_t>(held), order.end());
  order.resize(n - held);
  return {order, eval};
}

/// [begin, end) ranges covering [0, n) in steps of `size`, at most `max_batches` of them (0 = all): the batches of
/// an evaluation set.
inline std::vector<std::pair<size_t, size_t>> batch_ranges(size_t n, int64_t size, int64_t max_batches = 0) {
  if (size <= 0) rlhf::detail::fail("batch_size must be positive, got {}", size);
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t start = 0; start < n && (max_batches <= 0 || static_cast<int64_t>(out.size()) < max_batches);
       start += static_cast<size_t>(size))
    out.emplace_back(start, std::min(n, start + static_cast<size_t>(size)));
  return out;
}

/// The indices [begin, end).
inline std::vector<size_t> iota(size_t begin, size_t end) {
  std::vector<size_t> out;
  for (size_t i = begin; i < end; ++i) out.push_back(i);
  return out;
}

template <class T>
std::vector<T> pick(const std::vector<T>& items, const std::vector<size_t>& indices) {
  std::vector<T> out;
  out.reserve(indices.size());
  for (size_t i : indices) out.push_back(items[i]);
  return out;
}

/// Samples continuations of `prompts` from `model` (eval mode, no gradients): one JSON object per prompt.
inline nlohmann::json sample_texts(GPT2<>& model, const GPT2Tokenizer& tokenizer,
                                   const std::vector<std::string>& prompts, SamplingConfig sampling) {
  nlohmann::json out = nlohmann::json::array();
  if (prompts.empty()) return out;
  const bool was_training = model->is_training();
  model->eval();
  auto batch = encode_batch(tokenizer, prompts, tokenizer.eos_id(), false, true);
  sampling.pad_id = tokenizer.eos_id();
  if (sampling.stop_at_eos) sampling.eos_id = tokenizer.eos_id();
  auto gen = generate(*model, batch.input_ids.to(model->device()), batch.attention_mask.to(model->device()),
                      sampling);
  const auto ids = gen.token_ids();
  for (size_t i = 0; i < prompts.size(); ++i)
    out.push_back({{"prompt", valid_utf8(prompts[i])}, {"completion", valid_utf8(tokenizer.decode(ids[i]))}});
  if (was_training) model->train();
  return out;
}

/// Opens the run folder of a stage with its resolved config.
inline run::RunDir open_run(const std::string& out, const nlohmann::json& config, bool resume, int64_t keep,
                            std::vector<std::string> resumable_keys = {}) {
  if (out.empty()) rlhf::detail::fail("out: the run folder must be set");
  return run::RunDir::create(out, config, resume,
                             run::RunOptions{.resumable_keys = std::move(resumable_keys),
                                             .keep_last = static_cast<int>(keep)});
}

}  // namespace detail

/// What a stage run returns: where its outputs are and its final metrics.
struct StageResult {
  bool completed = false;             ///< false when interrupted (a checkpoint was written)
  std::filesystem::path run_dir;      ///< the run folder
  std::filesystem::path model_dir;    ///< the exported model (run_dir / "model"), when completed
  nlohmann::json last_metrics = nlohmann::json::object();
  nlohmann::json last_eval = nlohmann::json::object();
};

// ---- pretraining and supervised fine-tuning ----

/// `rlhf pretrain`: next-token training on a text corpus cut into windows.
struct PretrainConfig {
  std::string out = "runs/pretrain";       ///< run folder
  ModelSpec model;                         ///< starting model (empty path: a fresh model)
  std::string corpus = "data/reviews.txt"; ///< a text file, or a folder of *.txt files
  int64_t context = 64;                    ///< tokens per window, e.g. 64
  int64_t stride = 0;                      ///< tokens between window starts (0 = context)
  double held_out = 0.02;                  ///< fraction of the corpus (its end) kept for evaluation
  int64_t batch_size = 16;                 ///< windows per step
  int64_t eval_batches = 8;                ///< held-out batches per evaluation
  LMTrainConfig train{.total_steps = 1500, .lr = 2e-3, .warmup_steps = 50};
  Schedule schedule;
  std::vector<std::string> sample_prompts = {"The film was", "I thought the"};  ///< prompts of samples.jsonl
  SamplingConfig sampling{.max_new_tokens = 48, .top_k = 0};                   ///< how samples are drawn
};

template <class V>
void visit_fields(PretrainConfig& c, V&& v) {
  v("out", c.out, "run folder");
  v("model", c.model);
  v("corpus", c.corpus, "text file or folder of *.txt files");
  v("context", c.context, "tokens per window");
  v("stride", c.stride, "tokens between window starts (0 = context)");
  v("held_out", c.held_out, "fraction of the corpus kept for evaluation");
  v("batch_size", c.batch_size, "windows per step");
  v("eval_batches", c.eval_batches, "held-out batches per evaluation");
  v("train", c.train);
  v("schedule", c.schedule);
  v("sample_prompts", c.sample_prompts, "prompts sampled into samples.jsonl");
  v("sampling", c.sampling);
}

namespace detail {

/// The part of every language-model stage after the data: trainer, loop, export.
template <class NextBatch, class EvalBatches>
StageResult run_lm(const std::string& label, const std::string& out, const nlohmann::json& resolved, bool resume,
                   LoadedModel loaded, const LMTrainConfig& train, const Schedule& schedule, size_t n_train,
                   int64_t batch_size, NextBatch next_batch, EvalBatches eval_batches,
                   const std::vector<std::string>& sample_prompts, const SamplingConfig& sampling) {
  auto run = open_run(out, resolved, resume, schedule.keep_checkpoints, {"/train/total_steps", "/schedule"});
  LMTrainer<> trainer(loaded.model, train);
  data::EpochSampler sampler(n_train, train.seed);
  const auto held = eval_batches();
  LoopHooks hooks{.batch_size = batch_size};
  hooks.step = [&](const std::vector<size_t>& idx) {
    auto batch = next_batch(idx);
    return numbers_only(trainer.step(batch.ids, batch.attention_mask, batch.loss_mask).to_json());
  };
  if (!held.empty()) hooks.evaluate = [&] { return numbers_only(trainer.evaluate(held).to_json()); };
  if (!sample_prompts.empty()) {
    hooks.samples = [&] {
      SamplingConfig s = sampling;
      s.seed = static_cast<uint64_t>(trainer.step_count());
      return sample_texts(trainer.model(), loaded.tokenizer, sample_prompts, s);
    };
  }
  LoopOptions options{.total_steps = train.total_steps, .log_every = schedule.log_every,
                      .eval_every = schedule.eval_every, .sample_every = schedule.sample_every,
                      .checkpoint_every = schedule.checkpoint_every, .stop_after = schedule.stop_after, .label = label};
  auto loop = run_loop(run, trainer, sampler, options, hooks);
  StageResult result{.completed = loop.completed, .run_dir = run.path(), .last_metrics = loop.last_metrics,
                     .last_eval = loop.last_eval};
  if (loop.completed) {
    result.model_dir = run.path() / "model";
    export_model(trainer.model(), loaded.tokenizer, result.model_dir);
  }
  return result;
}

}  // namespace detail

/// Runs (or resumes) pretraining.
inline StageResult run_pretrain(const PretrainConfig& c, bool resume = false) {
  auto loaded = load_model(c.model);
  if (c.context > loaded.model->config().n_positions)
    rlhf::detail::fail("context: {} exceeds the model's n_positions {}", c.context, loaded.model->config().n_positions);
  auto windows = data::TokenWindows::from_corpus(loaded.tokenizer, c.corpus, {.context = c.context, .stride = c.stride});
  std::optional<data::TokenWindows> eval_windows;
  data::TokenWindows train_windows = windows;
  if (c.held_out > 0) {
    auto [t, e] = windows.split(c.held_out);
    train_windows = t;
    eval_windows = e;
  }
  auto next = [&](const std::vector<size_t>& idx) { return data::collate_windows(train_windows.batch(idx)); };
  auto held = [&] {
    std::vector<data::LMBatch> batches;
    if (!eval_windows) return batches;
    for (auto [begin, end] : detail::batch_ranges(eval_windows->size(), c.batch_size, c.eval_batches))
      batches.push_back(data::collate_windows(eval_windows->batch(detail::iota(begin, end))));
    return batches;
  };
  return detail::run_lm("pretrain", c.out, config::to_json_config(c), resume, std::move(loaded), c.train,
                        c.schedule, train_windows.size(), c.batch_size, next, held, c.sample_prompts, c.sampling);
}

/// `rlhf sft`: supervised fine-tuning on prompt -> completion pairs, loss on completion tokens only.
struct SFTConfig {
  std::string out = "runs/sft";       ///< run folder
  ModelSpec model;                    ///< starting model (usually a pretrained folder)
  std::string data;                   ///< JSONL with fields prompt, completion
  data::LengthFilter filter;          ///< keep completions within these token counts (the seed: 24-48)
  int64_t max_length = 128;           ///< tokens per example after truncation
  double held_out = 0.05;             ///< fraction of examples kept for evaluation
  int64_t batch_size = 8;             ///< examples per step
  int64_t eval_batches = 8;           ///< held-out batches per evaluation
  LMTrainConfig train{.total_steps = 300, .lr = 1e-4, .warmup_steps = 10};
  Schedule schedule;
  int64_t num_samples = 4;            ///< held-out prompts sampled into samples.jsonl
  SamplingConfig sampling{.max_new_tokens = 48, .top_k = 0};
};

template <class V>
void visit_fields(SFTConfig& c, V&& v) {
  v("out", c.out, "run folder");
  v("model", c.model);
  v("data", c.data, "JSONL file with fields prompt, completion");
  v("filter", c.filter);
  v("max_length", c.max_length, "tokens per example after truncation");
  v("held_out", c.held_out, "fraction of examples kept for evaluation");
  v("batch_size", c.batch_size, "examples per step");
  v("eval_batches", c.eval_batches, "held-out batches per evaluation");
  v("train", c.train);
  v("schedule", c.schedule);
  v("num_samples", c.num_samples, "held-out prompts sampled into samples.jsonl");
  v("sampling", c.sampling);
}

/// Runs (or resumes) supervised fine-tuning.
inline StageResult run_sft(const SFTConfig& c, bool resume = false) {
  if (c.data.empty()) rlhf::detail::fail("data: set the JSONL file of prompt/completion pairs");
  auto loaded = load_model(c.model);
  auto examples = data::load_sft(c.data);
  if (c.filter.min_tokens > 0 || c.filter.max_tokens > 0)
    examples = data::filter_sft(loaded.tokenizer, examples, c.filter).kept;
  auto [train_idx, eval_idx] = detail::split_indices(examples.size(), c.held_out, c.train.seed, c.data);
  auto train_set = detail::pick(examples, train_idx);
  auto eval_set = detail::pick(examples, eval_idx);
  const GPT2Tokenizer tokenizer = loaded.tokenizer;  // a copy: `loaded` is moved into run_lm, which calls `next`
  auto next = [&](const std::vector<size_t>& idx) {
    auto rows = detail::pick(train_set, idx);
    return data::collate_sft(tokenizer, rows, c.max_length);
  };
  auto held = [&] {
    std::vector<data::LMBatch> batches;
    for (auto [begin, end] : detail::batch_ranges(eval_set.size(), c.batch_size, c.eval_batches))
      batches.push_back(data::collate_sft(
          tokenizer, std::span<const data::SFTExample>(eval_set.data() + begin, end - begin), c.max_length));
    return batches;
  };
  std::vector<std::string> prompts;
  for (size_t i = 0; i < eval_set.size() && static_cast<int64_t>(i) < c.num_samples; ++i)
    prompts.push_back(eval_set[i].prompt);
  return detail::run_lm("sft", c.out, config::to_json_config(c), resume, std::move(loaded), c.train, c.schedule,
                        train_set.size(), c.batch_size, next, held, prompts, c.sampling);
}

// ---- reward model ----

/// `rlhf reward`: a reward model trained on preference pairs (Bradley-Terry), normalised on the training texts.
struct RewardConfig {
  std::string out = "runs/reward";   ///< run folder
  ModelSpec model;                   ///< the transformer the reward model starts from (the seed: the SFT model)
  std::string data;                  ///< JSONL with fields prompt, chosen, rejected
  data::LengthFilter filter;         ///< keep pairs whose chosen and rejected are within these token counts
  int64_t max_length = 128;          ///< tokens per text after truncation (the end is kept)
  double held_out = 0.1;             ///< fraction of pairs kept for evaluation
  int64_t batch_size = 16;           ///< pairs per step
  int64_t normalise_on = 512;        ///< training texts the outputs are normalised over (mean 0, std 1); 0 = off
  RewardTrainConfig train{.total_steps = 300, .lr = 1e-4, .head_lr = 1e-3, .warmup_steps = 10};
  Schedule schedule{.eval_every = 50, .sample_every = 0};
};

template <class V>
void visit_fields(RewardConfig& c, V&& v) {
  v("out", c.out, "run folder");
  v("model", c.model);
  v("data", c.data, "JSONL file with fields prompt, chosen, rejected");
  v("filter", c.filter);
  v("max_length", c.max_length, "tokens per text after truncation");
  v("held_out", c.held_out, "fraction of pairs kept for evaluation");
  v("batch_size", c.batch_size, "pairs per step");
  v("normalise_on", c.normalise_on, "training texts the outputs are normalised over (0 = off)");
  v("train", c.train);
  v("schedule", c.schedule);
}

/// Runs (or resumes) reward-model training; exports the normalised reward model to run_dir/model.
inline StageResult run_reward(const RewardConfig& c, bool resume = false) {
  if (c.data.empty()) rlhf::detail::fail("data: set the JSONL file of preference pairs");
  auto loaded = load_model(c.model);
  auto pairs = data::load_preferences(c.data);
  if (c.filter.min_tokens > 0 || c.filter.max_tokens > 0)
    pairs = data::filter_preferences(loaded.tokenizer, pairs, c.filter).kept;
  auto [train_idx, eval_idx] = detail::split_indices(pairs.size(), c.held_out, c.train.seed, c.data);
  auto train_set = detail::pick(pairs, train_idx);
  auto eval_set = detail::pick(pairs, eval_idx);
  const auto& tokenizer = loaded.tokenizer;
  auto run = detail::open_run(c.out, config::to_json_config(c), resume, c.schedule.keep_checkpoints,
                              {"/train/total_steps", "/schedule"});
  auto model = RewardModel<>::from_copy(loaded.model);
  RewardTrainer<> trainer(model, c.train);
  data::EpochSampler sampler(train_set.size(), c.train.seed);
  std::vector<PreferenceBatch> held;
  for (auto [begin, end] : detail::batch_ranges(eval_set.size(), c.batch_size))
    held.push_back(data::collate_preferences(
        tokenizer, std::span<const data::PreferencePair>(eval_set.data() + begin, end - begin), c.max_length));
  LoopHooks hooks{.batch_size = c.batch_size};
  hooks.step = [&](const std::vector<size_t>& idx) {
    auto rows = detail::pick(train_set, idx);
    return detail::numbers_only(trainer.step(data::collate_preferences(tokenizer, rows, c.max_length)).to_json());
  };
  if (!held.empty()) hooks.evaluate = [&] { return detail::numbers_only(trainer.evaluate(held).to_json()); };
  LoopOptions options{.total_steps = c.train.total_steps, .log_every = c.schedule.log_every,
                      .eval_every = c.schedule.eval_every, .checkpoint_every = c.schedule.checkpoint_every,
                      .stop_after = c.schedule.stop_after, .label = "reward", .plot = {{"loss", {"loss", "eval_loss"}},
                                                  {"accuracy", {"accuracy", "eval_accuracy"}}}};
  auto loop = run_loop(run, trainer, sampler, options, hooks);
  StageResult result{.completed = loop.completed, .run_dir = run.path(), .last_metrics = loop.last_metrics,
                     .last_eval = loop.last_eval};
  if (!loop.completed) return result;
  if (c.normalise_on > 0) {
    std::vector<std::string> texts;
    for (const auto& p : train_set) {
      if (static_cast<int64_t>(texts.size()) >= c.normalise_on) break;
      texts.push_back(p.prompt + p.chosen);
      texts.push_back(p.prompt + p.rejected);
    }
    auto enc = encode_for_reward(tokenizer, texts, true, c.max_length);
    std::vector<std::pair<torch::Tensor, torch::Tensor>> batches;
    for (auto [begin, end] : detail::batch_ranges(static_cast<size_t>(enc.input_ids.size(0)), c.batch_size)) {
      const auto b = static_cast<int64_t>(begin), n = static_cast<int64_t>(end - begin);
      batches.emplace_back(enc.input_ids.narrow(0, b, n), enc.attention_mask.narrow(0, b, n));
    }
    model->normalise_on(batches);
  }
  result.model_dir = run.path() / "model";
  model.save_pretrained(result.model_dir);
  tokenizer.save_pretrained(result.model_dir);
  return result;
}

// ---- PPO ----

/// Where PPO's reward comes from: a learned reward model folder, or a word-list rule.
struct RewardSpec {
  std::string model;    ///< reward-model folder written by `rlhf reward` (run/model)
  std::string lexicon;  ///< or a word-list JSON {"positive": [...], "negative": [...]} (rewards/lexicon.hpp)
};

template <class V>
void visit_fields(RewardSpec& c, V&& v) {
  v("model", c.model, "reward-model folder written by `rlhf reward` (its run's model/)");
  v("lexicon", c.lexicon, "or a word-list JSON {positive, negative} scored as positive - negative words");
}

/// `rlhf ppo`: PPO of a policy against a reward, with an optional gold rule logged beside it.
/// How the KL coefficient moves: `ppo.kl_coef` is its start, fixed or adapted (Ziegler et al. 2019) towards `target`.
struct KLControlConfig {
  KLControl controller = KLControl::adaptive;  ///< fixed | adaptive
  double target = 6.0;                         ///< adaptive: KL (nats per sample) to hold, e.g. 6
  double horizon = 10000;                      ///< adaptive: samples over which a 20% error moves beta by ~e^0.2
};

template <class V>
void visit_fields(KLControlConfig& c, V&& v) {
  v("controller", c.controller, "fixed: beta stays ppo.kl_coef; adaptive: beta moves to hold the KL at target");
  v("target", c.target, "adaptive: the KL (nats per sample) to hold");
  v("horizon", c.horizon, "adaptive: samples over which a 20% KL error changes beta by about e^0.2");
}

struct PPORunConfig {
  std::string out = "runs/ppo";   ///< run folder
  ModelSpec policy;               ///< the starting policy (the seed: the SFT model); its frozen copy is the reference
  RewardSpec reward;              ///< what PPO optimises
  std::string gold;               ///< optional word-list JSON scored on every sample and logged as gold_mean
  std::string prompts;            ///< JSONL with field prompt; empty = ppo.prefix for every sample
  PPOConfig ppo{.total_phases = 60, .batch_size = 32, .base_lr = 1e-4, .head_lr = 1e-3, .warmup_steps = 5,
                .gen_len = 32, .top_k = 0, .prefix = "The film", .kl_coef = 0.05};
  KLControlConfig kl;             ///< the KL coefficient's controller (starting at ppo.kl_coef)
  Schedule schedule{.log_every = 1, .eval_every = 0, .sample_every = 10, .checkpoint_every = 10};
};

template <class V>
void visit_fields(PPORunConfig& c, V&& v) {
  v("out", c.out, "run folder");
  v("policy", c.policy);
  v("reward", c.reward);
  v("gold", c.gold, "optional word-list JSON logged as gold_mean beside the reward");
  v("prompts", c.prompts, "JSONL file with field prompt; empty = ppo.prefix");
  v("ppo", c.ppo);
  v("kl", c.kl);
  v("schedule", c.schedule);
}

namespace detail {

/// What the last rollout looked like, kept by TrackedReward for logs.
struct RolloutRecord {
  std::vector<std::string> prompts, completions;
  std::vector<double> scores, gold;
};

/// A reward that remembers the last rollout's texts and scores, and scores them with a gold rule too.
template <class R>
struct TrackedReward {
  R inner;
  std::shared_ptr<RolloutRecord> record = std::make_shared<RolloutRecord>();
  std::optional<LexiconReward> gold;

  torch::Tensor operator()(const Rollout& rollout) {
    auto scores = inner(rollout);
    record->prompts = rollout.prompts;
    record->completions = rollout.completions;
    auto s = scores.to(torch::kCPU, torch::kDouble).contiguous();
    const double* data = s.template data_ptr<double>();
    record->scores.assign(data, data + s.numel());
    record->gold.clear();
    if (gold)
      for (const auto& text : rollout.completions) record->gold.push_back(gold->score(text));
    return scores;
  }
};

template <class R>
StageResult run_ppo_with(const PPORunConfig& c, bool resume, R inner, LoadedModel loaded) {
  TrackedReward<R> reward{.inner = std::move(inner)};
  if (!c.gold.empty()) reward.gold = LexiconReward::from_file(c.gold);
  auto record = reward.record;
  std::vector<std::string> prompts =
      c.prompts.empty() ? std::vector<std::string>{c.ppo.prefix} : data::load_prompts(c.prompts);
  auto run = open_run(c.out, config::to_json_config(c), resume, c.schedule.keep_checkpoints,
                      {"/ppo/total_phases", "/schedule"});
  torch::manual_seed(c.ppo.seed);  // the value head's initial weights
  ActorCritic<> policy(loaded.model);
  PPOTrainer<ActorCritic<>, TrackedReward<R>, ConfiguredKL> trainer(
      policy, std::move(reward),
      ConfiguredKL({.controller = c.kl.controller, .init = c.ppo.kl_coef, .target = c.kl.target,
                    .horizon = c.kl.horizon}),
      c.ppo, loaded.tokenizer);
  data::EpochSampler sampler(prompts.size(), c.ppo.seed);
  LoopHooks hooks{.batch_size = c.ppo.batch_size};
  hooks.step = [&](const std::vector<size_t>& idx) {
    auto batch = pick(prompts, idx);
    auto stats = numbers_only(trainer.step(batch).to_json());
    if (!record->gold.empty()) {
      double sum = 0;
      for (double g : record->gold) sum += g;
      stats["gold_mean"] = sum / static_cast<double>(record->gold.size());
    }
    return stats;
  };
  hooks.samples = [&] {
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < std::min<size_t>(4, record->completions.size()); ++i) {
      nlohmann::json s = {{"prompt", valid_utf8(record->prompts[i])},
                          {"completion", valid_utf8(record->completions[i])},
                          {"reward", record->scores[i]}};
      if (!record->gold.empty()) s["gold"] = record->gold[i];
      out.push_back(s);
    }
    return out;
  };
  LoopOptions options{.total_steps = c.ppo.total_phases, .log_every = c.schedule.log_every,
                      .eval_every = 0, .sample_every = c.schedule.sample_every,
                      .checkpoint_every = c.schedule.checkpoint_every, .stop_after = c.schedule.stop_after,
                      .label = "ppo",
                      .plot = {{"reward", {"reward_mean", "gold_mean"}}, {"KL to the reference", {"kl"}}},
                      .postfix_key = "reward_mean"};
  auto loop = run_loop(run, trainer, sampler, options, hooks);
  StageResult result{.completed = loop.completed, .run_dir = run.path(), .last_metrics = loop.last_metrics};
  if (loop.completed) {
    result.model_dir = run.path() / "model";
    export_model(trainer.policy()->base, loaded.tokenizer, result.model_dir);
  }
  return result;
}

}  // namespace detail

/// Runs (or resumes) PPO; exports the tuned policy's base model to run_dir/model.
inline StageResult run_ppo(const PPORunConfig& c, bool resume = false) {
  auto loaded = load_model(c.policy);
  const bool has_model = !c.reward.model.empty(), has_lexicon = !c.reward.lexicon.empty();
  if (has_model == has_lexicon)
    rlhf::detail::fail("reward: set exactly one of reward.model (a reward-model folder) and reward.lexicon (a "
                       "word-list JSON)");
  if (has_lexicon) return detail::run_ppo_with(c, resume, LexiconReward::from_file(c.reward.lexicon), std::move(loaded));
  const auto device = parse_device(c.policy.device, "policy.device");
  auto rm = RewardModel<>::from_pretrained(c.reward.model, {.device = device});
  auto rm_tokenizer = GPT2Tokenizer::from_pretrained(c.reward.model);
  LearnedRewardOptions options{.precision = c.ppo.precision};
  if (rm_tokenizer.vocab() == loaded.tokenizer.vocab())
    return detail::run_ppo_with(c, resume, LearnedReward<>(rm, options), std::move(loaded));
  return detail::run_ppo_with(c, resume, LearnedReward<>(rm, rm_tokenizer, options), std::move(loaded));
}

}  // namespace rlhf::pipeline
