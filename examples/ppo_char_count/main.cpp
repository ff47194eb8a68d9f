// The seed notebook's first RLHF task: reward = number of '.' characters in the sample. PPO against it on a small
// GPT-2-architecture model (random weights with the byte-level tokenizer by default, or a Hugging Face GPT-2 folder
// given with --model), printing per-phase statistics and samples before and after.

#include <algorithm>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <rlhf/rlhf.hpp>

namespace {

double count_periods(const std::string& text) { return static_cast<double>(std::count(text.begin(), text.end(), '.')); }

/// Builds the policy (fresh small model or a folder) with the adapter policy of `Base`, trains and prints.
template <class Base>
void train(const std::string& model_dir, const rlhf::PPOConfig& config, int64_t phases) {
  using Policy = rlhf::ActorCritic<Base>;
  torch::manual_seed(config.seed);
  auto tokenizer = model_dir.empty() ? rlhf::GPT2Tokenizer::byte_level()
                                     : rlhf::GPT2Tokenizer::from_pretrained(model_dir);
  auto policy = model_dir.empty()
                    ? Policy(Base(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 128,
                                                   .n_embd = 64, .n_layer = 2, .n_head = 4,
                                                   .bos_token_id = tokenizer.eos_id(),
                                                   .eos_token_id = tokenizer.eos_id()}))
                    : Policy::from_pretrained(model_dir);
  auto reward = rlhf::FunctionReward(count_periods);
  rlhf::PPOTrainer<Policy, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config, tokenizer);
  fmt::print("{:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}\n", "phase", "reward", "kl", "entropy",
             "pg_loss", "v_loss", "clipfrac", "ex_var", "tokens/s");
  std::vector<std::string> first_samples;
  rlhf::PhaseStats last;
  for (int64_t i = 0; i < phases; ++i) {
    last = trainer.step();
    if (i == 0) first_samples = last.samples;
    fmt::print("{:>5} {:>8.3f} {:>8.3f} {:>8.3f} {:>8.4f} {:>8.4f} {:>8.3f} {:>7.3f} {:>9.0f}\n", last.phase,
               last.reward_mean, last.kl, last.entropy, last.policy_loss, last.value_loss, last.clip_fraction,
               last.explained_variance, last.tokens_per_second);
  }
  fmt::print("\nsamples of the first phase:\n");
  for (const auto& s : first_samples) fmt::print("  {}{}\n", config.prefix, rlhf::printable(s));
  fmt::print("samples of the last phase:\n");
  for (const auto& s : last.samples) fmt::print("  {}{}\n", config.prefix, rlhf::printable(s));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"PPO on a small GPT-2: reward = number of '.' in the sample"};
  std::string model_dir, precision = "auto";
  int64_t phases = 100;
  int threads = 0;
  bool lora = false;
  rlhf::PPOConfig config{.seed = 1, .batch_size = 32, .num_minibatches = 4, .base_lr = 2e-3, .head_lr = 2e-3,
                         .warmup_steps = 3, .final_scale = 0.5, .gen_len = 16, .top_k = 0, .prefix = "This is",
                         .kl_coef = 0.2, .lambda = 0.95};
  app.add_option("--model", model_dir, "Hugging Face GPT-2 folder (default: a small random model)");
  app.add_option("--phases", phases, "PPO phases")->capture_default_str();
  app.add_option("--batch-size", config.batch_size)->capture_default_str();
  app.add_option("--gen-len", config.gen_len)->capture_default_str();
  app.add_option("--base-lr", config.base_lr, "learning rate of the base model (or of the adapters with --lora)")
      ->capture_default_str();
  app.add_option("--kl-coef", config.kl_coef)->capture_default_str();
  app.add_option("--top-k", config.top_k)->capture_default_str();
  app.add_option("--seed", config.seed)->capture_default_str();
  app.add_flag("--lora", lora, "train rank-8 LoRA adapters on attention and MLP instead of the whole model");
  app.add_option("--precision", precision,
                 "fp32, bf16 (bf16 autocast, fp32 weights and optimiser) or auto (bf16 where the CPU or GPU "
                 "computes bf16 natively)")
      ->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores");
  CLI11_PARSE(app, argc, argv);
  config.total_phases = std::max<int64_t>(phases, config.warmup_steps + 1);

  try {
    config.precision = rlhf::parse_precision(precision);
    rlhf::configure_runtime({.threads = threads});
    if (lora)
      train<rlhf::GPT2<rlhf::LoRA<8, rlhf::Targets::Attention | rlhf::Targets::MLP>>>(model_dir, config, phases);
    else
      train<rlhf::GPT2<>>(model_dir, config, phases);
  } catch (const rlhf::Error& e) {
    fmt::print(stderr, "ppo_char_count: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
