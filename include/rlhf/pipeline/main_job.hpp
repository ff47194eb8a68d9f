#pragma once
/// @file The whole recipe in one run (`rlhf pipeline`, the README's first command): pretrain a GPT-2-architecture
/// model on a corpus, sample pairs of continuations and label them with a rule that plays the human labeler, train a
/// reward model on the pairs, run PPO against the learned reward model, and report the rule's (gold) score beside
/// the reward model's (proxy) score over the PPO phases, with samples before and after.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/data/datasets.hpp>
#include <rlhf/data/sampler.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/log/printable.hpp>
#include <rlhf/pipeline/eval.hpp>
#include <rlhf/pipeline/stages.hpp>
#include <rlhf/rewards/lexicon.hpp>
#include <rlhf/run/metrics.hpp>

namespace rlhf::pipeline {

/// How the preference pairs are made: two samples per prompt from the pretrained model, the rule prefers the one
/// it scores higher, ties are dropped.
struct PairsConfig {
  int64_t count = 2000;       ///< labelled pairs to collect, e.g. 2000
  int64_t batch_size = 64;    ///< prompts sampled at once
  uint64_t seed = 7;          ///< seeds the prompt order and the samples
  SamplingConfig sampling{.max_new_tokens = 32, .top_k = 0};  ///< how the two continuations are drawn
};

template <class V>
void visit_fields(PairsConfig& c, V&& v) {
  v("count", c.count, "labelled pairs to collect");
  v("batch_size", c.batch_size, "prompts sampled at once");
  v("seed", c.seed, "seeds the prompt order and the samples");
  v("sampling", c.sampling);
}

/// The main job's settings. The stages' `out`, `model`/`policy`, `data`, `corpus`, `prompts`, `reward` and `gold`
/// keys are set by the pipeline from the top-level keys (out/<stage>, the previous stage's model).
struct MainJobConfig {
  std::string out = "runs/main";                      ///< folder of the whole job: one run folder per stage
  ModelSpec model;                                    ///< starting model: empty path = a fresh tiny GPT-2
  std::string corpus = "data/reviews.txt";            ///< pretraining text
  std::string lexicon = "data/sentiment_words.json";  ///< the rule that labels pairs (and the gold score)
  std::string prompts = "data/prompts.jsonl";         ///< prompts of the pairs and of PPO
  int64_t report_samples = 64;                        ///< samples scored before and after PPO
  PretrainConfig pretrain;
  PairsConfig pairs;
  RewardConfig reward{.held_out = 0.1, .batch_size = 32,
                      .train = {.total_steps = 250, .lr = 3e-4, .head_lr = 1e-3, .warmup_steps = 10},
                      .schedule = {.log_every = 10, .eval_every = 25, .sample_every = 0, .checkpoint_every = 50}};
  // GAE (lambda 0.95) rather than the seed's one-step advantages: with the score only on the last token, one-step
  // advantages reach early tokens only through the value head, and PPO moved the gold score 3-4x less in as many
  // phases. The adaptive controller (horizon 1000 samples, so it acts within the run) holds the KL near 6 nats.
  PPORunConfig ppo{.ppo = {.total_phases = 100, .batch_size = 32, .base_lr = 3e-4, .head_lr = 1e-3,
                            .warmup_steps = 5, .gen_len = 32, .top_k = 0, .prefix = "The film", .kl_coef = 0.2,
                            .lambda = 0.95},
                   .kl = {.controller = KLControl::adaptive, .target = 6.0, .horizon = 1000},
                   .schedule = {.log_every = 1, .eval_every = 0, .sample_every = 10, .checkpoint_every = 10}};
};

template <class V>
void visit_fields(MainJobConfig& c, V&& v) {
  v("out", c.out, "folder of the whole job (one run folder per stage)");
  v("model", c.model);
  v("corpus", c.corpus, "pretraining text (file or folder of *.txt)");
  v("lexicon", c.lexicon, "word lists of the rule that labels pairs and gives the gold score");
  v("prompts", c.prompts, "JSONL prompts of the pairs and of PPO");
  v("report_samples", c.report_samples, "samples scored before and after PPO");
  v("pretrain", c.pretrain);
  v("pairs", c.pairs);
  v("reward", c.reward);
  v("ppo", c.ppo);
}

namespace detail {

/// Samples two continuations per prompt from `model_dir` and keeps the pairs the rule tells apart.
inline std::vector<data::PreferencePair> label_pairs(const std::filesystem::path& model_dir,
                                                     const std::vector<std::string>& prompts,
                                                     const LexiconReward& rule, const PairsConfig& c,
                                                     const std::string& device) {
  if (c.count <= 0 || c.batch_size <= 0)
    rlhf::detail::fail("pairs: count ({}) and batch_size ({}) must be positive", c.count, c.batch_size);
  auto loaded = load_model({.path = model_dir.string(), .device = device});
  std::vector<data::PreferencePair> pairs;
  data::EpochSampler sampler(prompts.size(), c.seed);
  run::Progress progress("label pairs", c.count);
  int64_t attempts = 0;
  for (uint64_t round = 0; static_cast<int64_t>(pairs.size()) < c.count; ++round) {
    if (attempts > 20 * c.count)
      rlhf::detail::fail("pairs: the rule told apart only {} of {} sampled pairs ---> HINT: the model's samples "
                         "rarely contain the lexicon's words; pretrain longer or check the lexicon",
                         pairs.size(), attempts);
    auto batch = pick(prompts, sampler.next(static_cast<size_t>(c.batch_size)));
    SamplingConfig s = c.sampling;
    s.seed = c.seed * 1000003ULL + 2 * round;
    auto first = sample_texts(loaded.model, loaded.tokenizer, batch, s);
    s.seed += 1;
    auto second = sample_texts(loaded.model, loaded.tokenizer, batch, s);
    for (size_t i = 0; i < batch.size() && static_cast<int64_t>(pairs.size()) < c.count; ++i) {
      ++attempts;
      const auto a = first[i]["completion"].get<std::string>(), b = second[i]["completion"].get<std::string>();
      const double sa = rule.score(a), sb = rule.score(b);
      if (sa == sb) continue;
      pairs.push_back({.prompt = batch[i], .chosen = sa > sb ? a : b, .rejected = sa > sb ? b : a});
    }
    progress.update(static_cast<int64_t>(pairs.size()));
  }
  progress.finish();
  return pairs;
}

/// Gold (rule) and proxy (reward model) scores of `n` fixed-seed samples of `model_dir`, with 6 examples.
inline SampleScores score_model(const std::filesystem::path& model_dir, const std::filesystem::path& reward_dir,
                                const std::vector<std::string>& prompts, const LexiconReward& rule, int64_t n,
                                SamplingConfig sampling, const std::string& device) {
  auto loaded = load_model({.path = model_dir.string(), .device = device});
  auto rm = RewardModel<>::from_pretrained(reward_dir, {.device = parse_device(device)});
  LearnedReward<> proxy(rm, GPT2Tokenizer::from_pretrained(reward_dir));
  sampling.seed = 12345;
  return score_samples(loaded, prompts, n, sampling, &rule, &proxy, 6);
}

}  // namespace detail

namespace detail {

/// Where the main job finds one of its data files: `path` itself when it exists (relative paths are relative to the
/// working directory), else the same file under $RLHF_DATA_DIR, else under the data folder `cmake --install` wrote
/// (a program built with RLHF_INSTALLED_DATA_DIR defined, like the `rlhf` tool, knows it). A leading "data/" is
/// dropped when joining, so the defaults ("data/reviews.txt", ...) find the installed copies from any folder.
inline std::string locate_data_file(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty() || fs::exists(path) || fs::path(path).is_absolute()) return path;
  auto rest = fs::path(path);
  if (auto it = rest.begin(); it != rest.end() && *it == "data") {
    fs::path stripped;
    for (++it; it != rest.end(); ++it) stripped /= *it;
    rest = stripped;
  }
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("RLHF_DATA_DIR"); env != nullptr && *env != '\0') dirs.emplace_back(env);
#ifdef RLHF_INSTALLED_DATA_DIR
  dirs.emplace_back(RLHF_INSTALLED_DATA_DIR);
#endif
  for (const auto& dir : dirs)
    if (fs::exists(dir / rest)) return (dir / rest).string();
  return path;  // not found anywhere: the loader's error names the path as given
}

/// Fails when `c` sets a stage key that the pipeline sets itself (out, models, data of each stage).
inline void check_pipeline_keys(const MainJobConfig& c) {
  const MainJobConfig defaults;
  auto same = [](const auto& a, const auto& b) { return config::to_json_config(a) == config::to_json_config(b); };
  auto owned = [](bool changed, const char* key, const char* from) {
    if (changed)
      rlhf::detail::fail("pipeline: '{}' is set by the pipeline (from {}) ---> HINT: remove it, or run the stage "
                         "on its own with `rlhf {}`",
                         key, from, std::string_view(key).substr(0, std::string_view(key).find('.')));
  };
  owned(c.pretrain.out != defaults.pretrain.out, "pretrain.out", "out");
  owned(!same(c.pretrain.model, defaults.pretrain.model), "pretrain.model", "model");
  owned(c.pretrain.corpus != defaults.pretrain.corpus, "pretrain.corpus", "corpus");
  owned(c.reward.out != defaults.reward.out, "reward.out", "out");
  owned(!same(c.reward.model, defaults.reward.model), "reward.model", "the pretrained model");
  owned(c.reward.data != defaults.reward.data, "reward.data", "the labelled pairs");
  owned(c.ppo.out != defaults.ppo.out, "ppo.out", "out");
  owned(!same(c.ppo.policy, defaults.ppo.policy), "ppo.policy", "the pretrained model");
  owned(!same(c.ppo.reward, defaults.ppo.reward), "ppo.reward", "the trained reward model");
  owned(c.ppo.gold != defaults.ppo.gold, "ppo.gold", "lexicon");
  owned(c.ppo.prompts != defaults.ppo.prompts, "ppo.prompts", "prompts");
}

}  // namespace detail

/// Runs (or, with `resume`, continues) the whole recipe; returns the report (also written to out/report.md).
inline std::string run_main_job(MainJobConfig c, bool resume = false) {
  detail::check_pipeline_keys(c);
  for (auto* file : {&c.corpus, &c.lexicon, &c.prompts}) *file = detail::locate_data_file(*file);
  const std::filesystem::path out = c.out;
  std::filesystem::create_directories(out);
  const auto rule = LexiconReward::from_file(c.lexicon);
  const auto prompts = data::load_prompts(c.prompts);
  auto done = [&](const std::string& stage) { return std::filesystem::exists(out / stage / "model" / "config.json"); };

  // 1. pretraining (or continued training of a given model) on the corpus
  c.pretrain.out = (out / "pretrain").string();
  c.pretrain.model = c.model;
  c.pretrain.corpus = c.corpus;
  fmt::print(stderr, "== 1/4 pretraining on {}\n", c.corpus);
  if (!done("pretrain")) {
    auto r = run_pretrain(c.pretrain, resume && std::filesystem::exists(out / "pretrain" / "config.json"));
    if (!r.completed) return "interrupted during pretraining";
  }
  const auto base = out / "pretrain" / "model";

  // 2. preference pairs labelled by the rule
  const auto pairs_path = out / "pairs.jsonl";
  fmt::print(stderr, "== 2/4 labelling {} preference pairs with {}\n", c.pairs.count, c.lexicon);
  if (!std::filesystem::exists(pairs_path))
    data::save_preferences(pairs_path, detail::label_pairs(base, prompts, rule, c.pairs, c.model.device));

  // 3. the reward model, starting from the pretrained model
  c.reward.out = (out / "reward").string();
  c.reward.model = {.path = base.string(), .device = c.model.device};
  c.reward.data = pairs_path.string();
  fmt::print(stderr, "== 3/4 reward model on {}\n", pairs_path.string());
  nlohmann::json rm_eval;
  if (!done("reward")) {
    auto r = run_reward(c.reward, resume && std::filesystem::exists(out / "reward" / "config.json"));
    if (!r.completed) return "interrupted during reward-model training";
  }
  for (const auto& record : run::read_metrics(out / "reward" / "metrics.jsonl"))
    if (record.contains("eval_accuracy")) rm_eval = record;

  // 4. PPO against the learned reward model, the rule logged as gold
  c.ppo.out = (out / "ppo").string();
  c.ppo.policy = {.path = base.string(), .device = c.model.device};
  c.ppo.reward = {.model = (out / "reward" / "model").string()};
  c.ppo.gold = c.lexicon;
  c.ppo.prompts = c.prompts;
  fmt::print(stderr, "== 4/4 PPO against the reward model\n");
  if (!done("ppo")) {
    auto r = run_ppo(c.ppo, resume && std::filesystem::exists(out / "ppo" / "config.json"));
    if (!r.completed) return "interrupted during PPO";
  }

  // ---- the report ----
  SamplingConfig sampling{.max_new_tokens = c.ppo.ppo.gen_len, .temperature = c.ppo.ppo.temperature,
                          .top_k = c.ppo.ppo.top_k, .top_p = c.ppo.ppo.top_p};
  auto before = detail::score_model(base, out / "reward" / "model", prompts, rule, c.report_samples, sampling,
                                    c.model.device);
  auto after = detail::score_model(out / "ppo" / "model", out / "reward" / "model", prompts, rule,
                                   c.report_samples, sampling, c.model.device);
  std::string report = "# rlhf main job\n\n";
  if (!rm_eval.is_null())
    report += fmt::format("Reward model: held-out accuracy {:.3f} (loss {:.3f}) on pairs labelled by the rule.\n\n",
                          rm_eval.value("eval_accuracy", 0.0), rm_eval.value("eval_loss", 0.0));
  report += "PPO against the reward model (proxy), with the rule's score (gold) per phase:\n\n";
  report += "| phase | gold (rule) | proxy (reward model) | KL to reference |\n|---:|---:|---:|---:|\n";
  auto metrics = run::read_metrics(out / "ppo" / "metrics.jsonl");
  const size_t every = std::max<size_t>(1, metrics.size() / 12);
  for (size_t i = 0; i < metrics.size(); ++i) {
    if (i % every != 0 && i + 1 != metrics.size()) continue;
    const auto& m = metrics[i];
    report += fmt::format("| {} | {:.3f} | {:.3f} | {:.3f} |\n", m.value("step", int64_t{0}),
                          m.value("gold_mean", 0.0), m.value("reward_mean", 0.0), m.value("kl", 0.0));
  }
  report += fmt::format("\n{} samples from the same prompts and seeds:\n\n| model | gold (rule) | proxy |\n"
                        "|---|---:|---:|\n| before PPO | {:.3f} | {:.3f} |\n| after PPO | {:.3f} | {:.3f} |\n",
                        c.report_samples, *before.gold, *before.proxy, *after.gold, *after.proxy);
  auto show = [&](const char* title, const nlohmann::json& samples) {
    report += fmt::format("\n{}:\n\n", title);
    for (const auto& s : samples)
      report += fmt::format("- [gold {:+.0f}, proxy {:+.2f}] {}{}\n", s["gold"].get<double>(),
                            s["proxy"].get<double>(), printable(s["prompt"].get<std::string>()),
                            printable(s["completion"].get<std::string>()));
  };
  show("Samples before PPO", before.examples);
  show("Samples after PPO", after.examples);
  report += fmt::format("\nRun folders: {0}/pretrain, {0}/reward, {0}/ppo (metrics.jsonl, TensorBoard files, "
                        "plot.png, checkpoints); pairs in {0}/pairs.jsonl.\n",
                        out.string());
  write_file_atomic(out / "report.md", report);
  return report;
}

}  // namespace rlhf::pipeline
