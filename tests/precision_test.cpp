#include "test_util.hpp"

#include <algorithm>
#include <fstream>
#include <string>

#include <rlhf/rlhf.hpp>

TEST_CASE("precision: bf16 autocast forward agrees with fp32 and restores the state") {
  torch::manual_seed(4);
  rlhf::GPT2<> model(rlhf::GPT2Config{.vocab_size = 300, .n_positions = 64, .n_embd = 128, .n_layer = 2, .n_head = 4});
  model->eval();
  auto ids = torch::randint(0, 300, {4, 20}, torch::kLong);
  torch::NoGradGuard no_grad;
  auto fp32 = model->logits(model->forward(ids)).log_softmax(-1);  // [4, 20, V]
  torch::Tensor bf16;
  {
    rlhf::AutocastScope scope(rlhf::Precision::bf16, torch::kCPU);
    CHECK(rlhf::autocast_enabled(torch::kCPU));
    auto hidden = model->forward(ids);
    CHECK((hidden.scalar_type() == torch::kFloat));  // the final layernorm runs in fp32
    bf16 = model->logits(hidden).log_softmax(-1);
  }
  CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
  CHECK((bf16.scalar_type() == torch::kFloat));
  const double mean_diff = (bf16 - fp32).abs().mean().item<double>();
  MESSAGE("mean |log p(bf16) - log p(fp32)| = " << mean_diff);
  CHECK(mean_diff < 2e-2);
  CHECK(mean_diff > 0);  // the bf16 path really ran
  // The language-model loss of the same batch agrees to 1%.
  auto targets = ids.narrow(1, 1, 19).unsqueeze(-1);
  const double loss_fp32 = -fp32.narrow(1, 0, 19).gather(-1, targets).mean().item<double>();
  const double loss_bf16 = -bf16.narrow(1, 0, 19).gather(-1, targets).mean().item<double>();
  CHECK(loss_bf16 == doctest::Approx(loss_fp32).epsilon(0.01));
  {
    rlhf::AutocastScope scope(rlhf::Precision::fp32, torch::kCPU);
    CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
  }
  CHECK_THROWS_WITH_AS(rlhf::parse_precision("fp8", "PPOConfig.precision"),
                       "PPOConfig.precision: 'fp8' is not a precision (expected fp32, bf16 or auto)", rlhf::Error);
}

TEST_CASE("precision: auto, the trainers' default, is bf16 where the device computes bf16 natively") {
  CHECK(rlhf::PPOConfig{}.precision == rlhf::Precision::automatic);
  CHECK(rlhf::LMTrainConfig{}.precision == rlhf::Precision::automatic);
  CHECK(rlhf::RewardTrainConfig{}.precision == rlhf::Precision::automatic);
  CHECK(rlhf::LearnedRewardOptions{}.precision == rlhf::Precision::automatic);
  CHECK(rlhf::parse_precision("auto") == rlhf::Precision::automatic);
  CHECK(rlhf::to_string(rlhf::Precision::automatic) == "auto");
  // By device (tests/main.cpp pins auto to fp32 for the suite: unpinned here, pinned again on every way out, a
  // throw included, so later cases keep their fp32 numbers).
  struct RestoreSuitePin {
    ~RestoreSuitePin() { rlhf::set_automatic_precision(rlhf::Precision::fp32); }
  } restore_suite_pin;
  rlhf::set_automatic_precision(rlhf::Precision::automatic);
  // The kernel's view of the CPU: the avx512_bf16 flag of /proc/cpuinfo, where there is one.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  bool flags_seen = false, avx512_bf16 = false;
  while (std::getline(cpuinfo, line))
    if (line.rfind("flags", 0) == 0) {
      flags_seen = true;
      avx512_bf16 = line.find(" avx512_bf16") != std::string::npos;
      break;
    }
  if (flags_seen) CHECK(rlhf::native_bf16(torch::kCPU) == avx512_bf16);
  const auto cpu = rlhf::resolve_precision(rlhf::Precision::automatic, torch::kCPU);
  CHECK(cpu == (rlhf::native_bf16(torch::kCPU) ? rlhf::Precision::bf16 : rlhf::Precision::fp32));
  {
    rlhf::AutocastScope scope(rlhf::Precision::automatic, torch::kCPU);
    CHECK(rlhf::autocast_enabled(torch::kCPU) == (cpu == rlhf::Precision::bf16));
  }
  CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
  // fp32 and bf16 resolve to themselves, pinned or not.
  for (auto pin : {rlhf::Precision::automatic, rlhf::Precision::bf16, rlhf::Precision::fp32}) {
    rlhf::set_automatic_precision(pin);
    CHECK(rlhf::resolve_precision(rlhf::Precision::fp32, torch::kCPU) == rlhf::Precision::fp32);
    CHECK(rlhf::resolve_precision(rlhf::Precision::bf16, torch::kCPU) == rlhf::Precision::bf16);
    if (pin != rlhf::Precision::automatic)
      CHECK(rlhf::resolve_precision(rlhf::Precision::automatic, torch::kCPU) == pin);
  }
  rlhf::set_automatic_precision(rlhf::Precision::bf16);
  {
    rlhf::AutocastScope scope(rlhf::Precision::automatic, torch::kCPU);
    CHECK(rlhf::autocast_enabled(torch::kCPU));
  }
  rlhf::set_automatic_precision(rlhf::Precision::fp32);  // the suite's pin
  {
    rlhf::AutocastScope scope(rlhf::Precision::automatic, torch::kCPU);
    CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
  }
}

TEST_CASE("precision: PPO in bf16 learns the token-count task like fp32") {
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  torch::manual_seed(11);
  rlhf::GPT2Policy policy(rlhf::GPT2<>(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 64,
                                                        .n_embd = 32, .n_layer = 2, .n_head = 4}));
  auto reward = rlhf::FunctionReward([](const std::string& text) {
    return static_cast<double>(std::count_if(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }));
  });
  rlhf::PPOConfig config{.seed = 3, .total_phases = 30, .base_lr = 3e-3, .head_lr = 3e-3, .warmup_steps = 2,
                         .final_scale = 0.5, .gen_len = 12, .top_k = 0, .prefix = "n", .kl_coef = 0.2,
                         .lambda = 0.95, .kl_placement = rlhf::KLPlacement::reward,
                         .precision = rlhf::Precision::bf16};
  rlhf::PPOTrainer<rlhf::GPT2Policy, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config, tokenizer);
  std::vector<double> rewards;
  for (int i = 0; i < 30; ++i) rewards.push_back(trainer.step().reward_mean);
  const double before = (rewards[0] + rewards[1] + rewards[2]) / 3;
  const double after = (rewards[25] + rewards[26] + rewards[27] + rewards[28] + rewards[29]) / 5;
  MESSAGE("bf16 PPO: digits per 12-token sample " << before << " -> " << after);
  CHECK(after > before + 2.5);
  CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
  for (const auto& p : policy->parameters()) CHECK((p.scalar_type() == torch::kFloat));  // fp32 master weights
}
