// Trainer variants side by side, the way a user compares them: the same PPO task (the seed notebook's first one:
// reward = number of '.' in a sample) from the same starting model under one change at a time from a baseline (full
// fine-tuning, fixed KL, fp32): the adaptive KL controller, frozen embeddings and early blocks, LoRA adapters, bf16
// autocast. Each variant runs for several seeds; the table shows the reward reached, the KL to the reference, the time
// per phase, peak resident memory and the training state (trainable parameters, their gradients and AdamW moments).
//
// Every run is its own process (this program started again with --child), so that peak RSS is the run's own and no
// allocator state carries over from one variant to the next.
//
//   variants [--model DIR] [--phases 60] [--seeds 3] [--last 10] [--only NAME ...] [--base-lr 2e-3]
//            [--lora-lr 0 (= base-lr)] [--threads N] [--json PATH]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

namespace bench = rlhf::bench;
using json = nlohmann::json;
using LoRABase = rlhf::GPT2<rlhf::LoRA<8, rlhf::Targets::Attention | rlhf::Targets::MLP>>;

/// What one variant changes from the baseline.
struct Variant {
  std::string name, change;
  bool lora = false;
  rlhf::KLControl kl = rlhf::KLControl::fixed;
  rlhf::FreezeOptions freeze;
  rlhf::Precision precision = rlhf::Precision::fp32;
};

std::vector<Variant> variants(int64_t n_layer) {
  const int64_t frozen_blocks = std::max<int64_t>(n_layer / 2, 1);
  return {
      {.name = "baseline", .change = "full fine-tuning, fixed KL, fp32"},
      {.name = "adaptive-kl", .change = "adaptive KL controller (target 4 nats, horizon 1000 samples)",
       .kl = rlhf::KLControl::adaptive},
      {.name = "frozen",
       .change = frozen_blocks == 1 ? std::string("embeddings and block 0 frozen")
                                    : fmt::format("embeddings and blocks 0-{} frozen", frozen_blocks - 1),
       .freeze = {.embeddings = true, .first_blocks = frozen_blocks}},
      {.name = "lora", .change = "rank-8 LoRA on attention and MLP (base frozen)", .lora = true},
      {.name = "bf16", .change = "bf16 autocast (fp32 weights and optimiser)", .precision = rlhf::Precision::bf16},
  };
}

struct Args {
  std::string model_dir, json_path, child;
  std::vector<std::string> only;
  int64_t phases = 60, seeds = 3, last = 10;
  uint64_t seed = 1;
  double base_lr = 2e-3, lora_lr = 0;
  int threads = 0;
};

double count_periods(const std::string& text) { return static_cast<double>(std::count(text.begin(), text.end(), '.')); }

int64_t numel(const std::vector<torch::Tensor>& params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

/// The starting model: the folder given with --model, else a small random GPT-2 (2 x 64, byte-level tokenizer) whose
/// weights are the same in every run (seed 0), whatever the variant's seed.
template <class Base>
Base starting_model(const Args& a, const rlhf::GPT2Tokenizer& tokenizer) {
  if (!a.model_dir.empty()) return Base::from_pretrained(a.model_dir);
  const rlhf::GPT2Config config{.vocab_size = tokenizer.vocab_size(), .n_positions = 128, .n_embd = 64, .n_layer = 2,
                                .n_head = 4, .bos_token_id = tokenizer.eos_id(), .eos_token_id = tokenizer.eos_id()};
  torch::manual_seed(0);
  rlhf::GPT2<> plain(config);
  if constexpr (std::is_same_v<Base, rlhf::GPT2<>>) {
    return plain;
  } else {
    Base model(config);  // the adapters' own initialisation, then the same base weights as every other variant
    rlhf::copy_parameters(*plain, *model);
    return model;
  }
}

/// One run of `v` with seed `a.seed`: per-phase statistics reduced to what the table shows.
template <class Base>
json run_variant(const Args& a, const Variant& v) {
  auto tokenizer = a.model_dir.empty() ? rlhf::GPT2Tokenizer::byte_level()
                                       : rlhf::GPT2Tokenizer::from_pretrained(a.model_dir);
  rlhf::PPOConfig config{.seed = a.seed, .total_phases = a.phases, .batch_size = 32, .num_minibatches = 4,
                         .base_lr = v.lora && a.lora_lr > 0 ? a.lora_lr : a.base_lr, .head_lr = 2e-3,
                         .warmup_steps = 3, .final_scale = 0.5, .gen_len = 16, .top_k = 0, .prefix = "This is",
                         .kl_coef = 0.2, .lambda = 0.95, .precision = v.precision, .freeze = v.freeze};
  auto base = starting_model<Base>(a, tokenizer);
  torch::manual_seed(static_cast<int64_t>(a.seed));  // the value head's initial weights
  rlhf::ActorCritic<Base> policy(base);
  auto reward = rlhf::FunctionReward(count_periods);
  rlhf::PPOTrainer<rlhf::ActorCritic<Base>, decltype(reward), rlhf::ConfiguredKL> trainer(
      policy, reward,
      rlhf::ConfiguredKL({.controller = v.kl, .init = config.kl_coef, .target = 4.0, .horizon = 1000}), config,
      tokenizer);

  const int64_t total = numel(policy->parameters());
  const int64_t trainable = numel(policy->base_parameters()) + numel(policy->head_parameters());
  std::vector<rlhf::PhaseStats> stats;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < a.phases; ++i) stats.push_back(trainer.step());
  const double seconds = bench::seconds_since(start);

  auto mean_last = [&](auto field) {
    const int64_t k = std::min<int64_t>(a.last, static_cast<int64_t>(stats.size()));
    double sum = 0;
    for (int64_t i = static_cast<int64_t>(stats.size()) - k; i < static_cast<int64_t>(stats.size()); ++i)
      sum += field(stats[i]);
    return sum / static_cast<double>(k);
  };
  double phase_seconds = 0;  // phases after the first (which warms up allocators and caches)
  for (size_t i = 1; i < stats.size(); ++i)
    phase_seconds += stats[i].seconds_generation + stats[i].seconds_reward + stats[i].seconds_reference +
                     stats[i].seconds_training;
  phase_seconds /= static_cast<double>(std::max<size_t>(stats.size() - 1, 1));
  const double state_mb = 4.0 * static_cast<double>(trainable) * 4 / (1 << 20);  // weights + grads + 2 moments
  return {{"variant", v.name},
          {"seed", a.seed},
          {"reward_first", stats.front().reward_mean},
          {"reward", mean_last([](const auto& s) { return s.reward_mean; })},
          {"kl", mean_last([](const auto& s) { return s.kl; })},
          {"kl_coef", stats.back().kl_coef},
          {"entropy", mean_last([](const auto& s) { return s.entropy; })},
          {"seconds", seconds},
          {"seconds_per_phase", phase_seconds},
          {"seconds_training_per_phase", mean_last([](const auto& s) { return s.seconds_training; })},
          {"peak_rss_mb", bench::peak_rss_mb()},
          {"parameters", total},
          {"trainable", trainable},
          {"train_state_mb", state_mb},
          {"sample", stats.back().samples.empty() ? "" : rlhf::printable(stats.back().samples.front())}};
}

/// Starts this program again for one run and returns its JSON line.
json run_child(const Args& a, const std::string& variant, uint64_t seed) {
  static const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::string cmd = fmt::format("'{}' --child {} --seed {} --phases {} --last {} --base-lr {} --lora-lr {}",
                                self, variant, seed, a.phases, a.last, a.base_lr, a.lora_lr);
  if (a.threads > 0) cmd += fmt::format(" --threads {}", a.threads);
  if (!a.model_dir.empty()) cmd += fmt::format(" --model '{}'", a.model_dir);
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) throw std::runtime_error("could not start " + cmd);
  std::string out;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe.get())) out += buffer;
  std::istringstream lines(out);
  std::string result;  // the last JSON line
  for (std::string line; std::getline(lines, line);)
    if (!line.empty() && line.front() == '{') result = line;
  if (!result.empty()) return json::parse(result);
  throw std::runtime_error(fmt::format("{} (seed {}) printed no result:\n{}", variant, seed, out));
}

struct Summary {
  double mean = 0, sd = 0;
};

Summary summarise(const std::vector<json>& runs, const char* key) {
  Summary s;
  for (const auto& r : runs) s.mean += r[key].get<double>();
  s.mean /= static_cast<double>(runs.size());
  for (const auto& r : runs) s.sd += std::pow(r[key].get<double>() - s.mean, 2);
  s.sd = runs.size() > 1 ? std::sqrt(s.sd / static_cast<double>(runs.size() - 1)) : 0;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"PPO trainer variants side by side: reward, KL, time and memory on the same task"};
  Args a;
  app.add_option("--model", a.model_dir, "Hugging Face GPT-2 folder to start from (default: a small random model)");
  app.add_option("--phases", a.phases, "PPO phases per run")->capture_default_str();
  app.add_option("--seeds", a.seeds, "runs per variant (seeds 1..N)")->capture_default_str();
  app.add_option("--last", a.last, "reward and KL are the means over the last so many phases")->capture_default_str();
  app.add_option("--only", a.only, "variants to run (baseline, adaptive-kl, frozen, lora, bf16)");
  app.add_option("--base-lr", a.base_lr, "learning rate of the trained base-model weights")
      ->check(CLI::Validator(
          [](std::string& text) {
            char* end = nullptr;
            const double lr = std::strtod(text.c_str(), &end);
            const bool ok = end != text.c_str() && *end == '\0' && lr > 0 && lr <= 1;
            return ok ? std::string() : "expected a learning rate in (0, 1], got " + text;
          },
          "LR"))
      ->capture_default_str();
  app.add_option("--lora-lr", a.lora_lr, "learning rate of the LoRA adapters; 0 = --base-lr")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  app.add_option("--threads", a.threads, "0 = all cores");
  app.add_option("--json", a.json_path, "also write every run and the summary to this file");
  app.add_option("--child", a.child, "(internal) run one variant in this process and print its JSON line");
  app.add_option("--seed", a.seed, "(with --child) the run's seed");
  CLI11_PARSE(app, argc, argv);
  if (a.phases < 4 || a.seeds < 1 || a.last < 1) {
    fmt::print(stderr, "variants: need --phases >= 4, --seeds >= 1, --last >= 1\n");
    return 2;
  }

  try {
    auto runtime = rlhf::configure_runtime({.threads = a.threads});
    const int64_t n_layer = a.model_dir.empty() ? 2 : rlhf::GPT2Config::from_file(a.model_dir + "/config.json").n_layer;
    const auto all = variants(n_layer);
    if (!a.child.empty()) {
      auto v = std::find_if(all.begin(), all.end(), [&](const Variant& x) { return x.name == a.child; });
      if (v == all.end()) throw std::runtime_error("no variant named " + a.child);
      const json result = v->lora ? run_variant<LoRABase>(a, *v) : run_variant<rlhf::GPT2<>>(a, *v);
      fmt::print("{}\n", result.dump(-1, ' ', false, json::error_handler_t::replace));
      return 0;
    }
    if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);

    std::vector<Variant> chosen;
    for (const auto& v : all)
      if (a.only.empty() || std::find(a.only.begin(), a.only.end(), v.name) != a.only.end()) chosen.push_back(v);
    for (const auto& name : a.only)
      if (std::none_of(all.begin(), all.end(), [&](const Variant& v) { return v.name == name; }))
        throw std::runtime_error("--only: no variant named " + name);

    fmt::print("task: reward = number of '.' in 16 new tokens after \"This is\"; {} phases of 32 samples, {} seed(s) "
               "per variant; reward and KL are means over the last {} phases\n\n",
               a.phases, a.seeds, a.last);
    json report = {{"phases", a.phases}, {"seeds", a.seeds}, {"last", a.last}, {"threads", runtime.threads},
                   {"model", a.model_dir.empty() ? "random 2 x 64 GPT-2, byte-level tokenizer" : a.model_dir},
                   {"variants", json::array()}};
    std::vector<std::vector<json>> results;
    for (const auto& v : chosen) {
      std::vector<json> runs;
      for (int64_t s = 1; s <= a.seeds; ++s) {
        runs.push_back(run_child(a, v.name, static_cast<uint64_t>(s)));
        fmt::print("  {:<12} seed {}: reward {:.3f} -> {:.3f}, KL {:.2f}, {:.3f} s/phase, peak RSS {:.0f} MiB\n",
                   v.name, s, runs.back()["reward_first"].get<double>(), runs.back()["reward"].get<double>(),
                   runs.back()["kl"].get<double>(), runs.back()["seconds_per_phase"].get<double>(),
                   runs.back()["peak_rss_mb"].get<double>());
        std::fflush(stdout);
      }
      results.push_back(runs);
    }

    fmt::print("\n| variant | change | reward (start -> end) | KL | kl_coef | s/phase | vs baseline | peak RSS MiB | "
               "trainable | train state MiB |\n|---|---|---|---|---|---|---|---|---|---|\n");
    const double base_seconds = summarise(results.front(), "seconds_per_phase").mean;
    for (size_t i = 0; i < chosen.size(); ++i) {
      const auto& runs = results[i];
      const auto start = summarise(runs, "reward_first"), reward = summarise(runs, "reward"),
                 kl = summarise(runs, "kl"), coef = summarise(runs, "kl_coef"),
                 secs = summarise(runs, "seconds_per_phase"), rss = summarise(runs, "peak_rss_mb");
      const auto trainable = runs.front()["trainable"].get<int64_t>(), total = runs.front()["parameters"].get<int64_t>();
      fmt::print("| {} | {} | {:.2f} -> {:.2f} ± {:.2f} | {:.2f} ± {:.2f} | {:.3f} | {:.3f} | {:.2f}x | {:.0f} | "
                 "{} ({:.1f}%) | {:.1f} |\n",
                 chosen[i].name, chosen[i].change, start.mean, reward.mean, reward.sd, kl.mean, kl.sd, coef.mean,
                 secs.mean, secs.mean / base_seconds, rss.mean, trainable,
                 100.0 * static_cast<double>(trainable) / static_cast<double>(total),
                 runs.front()["train_state_mb"].get<double>());
      report["variants"].push_back({{"name", chosen[i].name}, {"change", chosen[i].change}, {"runs", runs},
                                    {"reward", {{"mean", reward.mean}, {"sd", reward.sd}}},
                                    {"kl", {{"mean", kl.mean}, {"sd", kl.sd}}},
                                    {"seconds_per_phase", secs.mean}, {"peak_rss_mb", rss.mean}});
    }
    fmt::print("\n(± is the standard deviation over seeds; train state = trainable weights + gradients + AdamW's two "
               "moments, fp32)\nlast samples:\n");
    for (size_t i = 0; i < chosen.size(); ++i)
      fmt::print("  {:<12} This is{}\n", chosen[i].name, results[i].front()["sample"].get<std::string>());
    fmt::print("{}\n", report.dump(-1, ' ', false, json::error_handler_t::replace));
    if (!a.json_path.empty())
      rlhf::write_file_atomic(a.json_path, report.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
  } catch (const std::exception& e) {
    fmt::print(stderr, "variants: {}\n", e.what());
    return 1;
  }
  return 0;
}
