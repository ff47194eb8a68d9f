// Peak memory and time of PPO phases on GPT-2-small shapes (random weights) for one trainer variant per process:
// full fine-tuning, frozen first half, or LoRA, in fp32 or bf16. benchmarks/ppo_memory.sh runs every variant and
// prints the table.
//
//   ppo_memory --variant full|frozen|lora --precision fp32|bf16 [--batch 16 --gen-len 32 --phases 2 --layers 12]

#include <chrono>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

template <class Policy>
nlohmann::json run(Policy policy, const rlhf::PPOConfig& config, int64_t phases) {
  auto reward = rlhf::FunctionReward([](const std::string& text) { return static_cast<double>(text.size() % 7); });
  rlhf::PPOTrainer<Policy, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config,
                                                                    rlhf::bench::placeholder_tokenizer());
  int64_t trainable = 0;
  for (const auto& p : policy->parameters())
    if (p.requires_grad()) trainable += p.numel();
  const double rss_before = rlhf::bench::peak_rss_mb();
  double seconds = 0, training = 0;
  for (int64_t i = 0; i < phases; ++i) {
    auto stats = trainer.step();
    if (i == 0) continue;  // the first phase warms up allocators and caches
    seconds += stats.seconds_generation + stats.seconds_reward + stats.seconds_reference + stats.seconds_training;
    training += stats.seconds_training;
  }
  const double timed = static_cast<double>(std::max<int64_t>(phases - 1, 1));
  return {{"trainable_parameters", trainable}, {"seconds_per_phase", seconds / timed},
          {"seconds_training", training / timed}, {"peak_rss_mb_after_setup", rss_before},
          {"peak_rss_mb", rlhf::bench::peak_rss_mb()}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"PPO phase peak memory and time for one trainer variant"};
  std::string variant = "full", precision = "fp32";
  int64_t phases = 2, layers = 12;
  int threads = 0;
  rlhf::PPOConfig config{.batch_size = 16, .num_minibatches = 4, .warmup_steps = 0, .gen_len = 32,
                         .kl_placement = rlhf::KLPlacement::reward};
  app.add_option("--variant", variant, "full, frozen (first half of the blocks and the embeddings) or lora")
      ->check(CLI::IsMember({"full", "frozen", "lora"}));
  app.add_option("--precision", precision, "fp32 or bf16")->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--batch", config.batch_size)->capture_default_str();
  app.add_option("--gen-len", config.gen_len)->capture_default_str();
  app.add_option("--phases", phases, "phases (the first is not timed)")->capture_default_str();
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores");
  CLI11_PARSE(app, argc, argv);
  rlhf::configure_runtime({.threads = threads});
  config.precision = rlhf::parse_precision(precision, "--precision");
  config.total_phases = phases;
  config.prefix = "The";
  rlhf::GPT2Config gpt2{.vocab_size = 50257, .n_layer = layers};
  torch::manual_seed(0);
  nlohmann::json result;
  if (variant == "lora") {
    using LoRAGPT2 = rlhf::GPT2<rlhf::LoRA<8, rlhf::Targets::Attention | rlhf::Targets::MLP>>;
    config.base_lr = 1e-4;
    result = run(rlhf::ActorCritic<LoRAGPT2>{LoRAGPT2(gpt2)}, config, phases);
  } else {
    if (variant == "frozen") config.freeze = {.embeddings = true, .first_blocks = layers / 2};
    result = run(rlhf::GPT2Policy{rlhf::GPT2<>(gpt2)}, config, phases);
  }
  result["variant"] = variant;
  result["precision"] = precision;
  result["batch_size"] = config.batch_size;
  result["gen_len"] = config.gen_len;
  fmt::print("{}\n", result.dump());
}
