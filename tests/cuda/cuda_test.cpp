// The library on a CUDA device, checked against the same computation on the CPU. Built only when LibTorch has
// CUDA (see tests/CMakeLists.txt); every case needs a GPU and says so when none is there.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include "../test_util.hpp"
#include "../ppo_fixtures.hpp"

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <rlhf/rlhf.hpp>

namespace {

// As in tests/main.cpp: configs left at auto run in fp32, on the GPU and in the CPU computation it is checked against.
[[maybe_unused]] const bool pinned_automatic_precision =
    (rlhf::set_automatic_precision(rlhf::Precision::fp32), true);

const torch::Device kGpu(torch::kCUDA, 0);

void require_gpu() { REQUIRE_MESSAGE(torch::cuda::is_available(), "rlhf_cuda_tests needs a CUDA device"); }

rlhf::GPT2Config small_config(int64_t vocab = 300) {
  return rlhf::GPT2Config{.vocab_size = vocab, .n_positions = 64, .n_embd = 64, .n_layer = 2, .n_head = 4,
                          .embd_pdrop = 0, .attn_pdrop = 0, .resid_pdrop = 0};
}

/// Largest |a - b| with both on the CPU.
double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kCPU).to(torch::kFloat) - b.to(torch::kCPU).to(torch::kFloat)).abs().max().item<double>();
}

using rlhf::test::count_digits;
using rlhf::test::tiny_byte_policy;

rlhf::PPOConfig learning_config(rlhf::Precision precision) {
  auto config = rlhf::test::digit_learning_config();
  config.kl_placement = rlhf::KLPlacement::loss;
  config.precision = precision;
  return config;
}

}  // namespace

TEST_CASE("cuda: the forward, KV-cache decoding and left padding give the CPU model's logits") {
  require_gpu();
  torch::manual_seed(1);
  rlhf::GPT2<> cpu(small_config());
  rlhf::GPT2<> gpu(small_config());
  rlhf::copy_parameters(*cpu, *gpu);
  gpu->place(kGpu, torch::kFloat);
  CHECK(gpu->device() == kGpu);
  cpu->eval();
  gpu->eval();
  torch::NoGradGuard no_grad;
  auto ids = torch::randint(0, 300, {3, 20}, torch::kLong);
  auto mask = torch::ones_like(ids);
  mask.index_put_({0, torch::indexing::Slice(0, 4)}, 0);  // row 0 is left-padded
  auto expected = cpu->logits(cpu->forward(ids, mask));
  auto full = gpu->logits(gpu->forward(ids.to(kGpu), mask.to(kGpu)));
  CHECK(full.is_cuda());
  CHECK(max_diff(full, expected) < 1e-4);
  // A 6-token prefix, then one token at a time, through the cache.
  auto cache = gpu->new_cache(3, 20);
  std::vector<torch::Tensor> parts{gpu->logits(gpu->forward(ids.narrow(1, 0, 6).to(kGpu), mask.narrow(1, 0, 6).to(kGpu),
                                                            &cache))};
  for (int64_t i = 6; i < 20; ++i)
    parts.push_back(gpu->logits(gpu->forward(ids.narrow(1, i, 1).to(kGpu), mask.narrow(1, 0, i + 1).to(kGpu), &cache)));
  CHECK(max_diff(torch::cat(parts, 1), full) < 1e-4);
}

TEST_CASE("cuda: bf16 autocast agrees with fp32, keeps the final layernorm in fp32 and restores the state") {
  require_gpu();
  torch::manual_seed(4);
  rlhf::GPT2<> model(small_config());
  model->place(kGpu, torch::kFloat);
  model->eval();
  torch::NoGradGuard no_grad;
  auto ids = torch::randint(0, 300, {4, 20}, torch::kLong).to(kGpu);
  auto fp32 = model->logits(model->forward(ids)).log_softmax(-1);
  torch::Tensor bf16;
  {
    rlhf::AutocastScope scope(rlhf::Precision::bf16, kGpu);
    CHECK(rlhf::autocast_enabled(torch::kCUDA));
    CHECK_FALSE(rlhf::autocast_enabled(torch::kCPU));
    auto hidden = model->forward(ids);
    CHECK((hidden.scalar_type() == torch::kFloat));
    bf16 = model->logits(hidden).log_softmax(-1);
  }
  CHECK_FALSE(rlhf::autocast_enabled(torch::kCUDA));
  const double mean_diff = (bf16.to(torch::kFloat) - fp32).abs().mean().item<double>();
  MESSAGE("CUDA: mean |log p(bf16) - log p(fp32)| = " << mean_diff);
  CHECK(mean_diff < 2e-2);
  CHECK(mean_diff > 0);  // the bf16 path really ran
}

TEST_CASE("cuda: sampling draws the CPU's tokens from the same seed") {
  require_gpu();
  torch::manual_seed(7);
  auto config = small_config(29);
  config.initializer_range = 0.3;  // peaked distributions: truncation matters
  rlhf::GPT2<> cpu(config);
  rlhf::GPT2<> gpu(config);
  rlhf::copy_parameters(*cpu, *gpu);
  gpu->place(kGpu, torch::kFloat);
  auto prompts = torch::tensor({{0, 0, 3, 4, 5}, {7, 8, 9, 10, 11}}, torch::kLong);
  auto mask = torch::tensor({{0, 0, 1, 1, 1}, {1, 1, 1, 1, 1}}, torch::kLong);
  for (auto [top_k, top_p] : std::vector<std::pair<int64_t, double>>{{1, 1.0}, {5, 1.0}, {0, 0.8}}) {
    CAPTURE(top_k);
    CAPTURE(top_p);
    rlhf::SamplingConfig sampling{.max_new_tokens = 12, .temperature = 0.7, .top_k = top_k, .top_p = top_p,
                                  .seed = 42};
    auto on_cpu = rlhf::generate(*cpu, prompts, mask, sampling);
    auto on_gpu = rlhf::generate(*gpu, prompts.to(kGpu), mask.to(kGpu), sampling);
    CHECK(on_gpu.ids.is_cuda());
    // The uniforms come from a CPU generator: the same seed draws the same tokens unless a draw falls within
    // rounding of a CDF boundary.
    const double same = on_gpu.ids.cpu().eq(on_cpu.ids).to(torch::kFloat).mean().item<double>();
    CHECK(same > 0.95);
    if (same == 1.0) CHECK(max_diff(on_gpu.logprobs, on_cpu.logprobs) < 1e-4);
  }
}

TEST_CASE("cuda: PPO learns the token-count reward in fp32 and in bf16, with fp32 master weights") {
  require_gpu();
  for (auto precision : {rlhf::Precision::fp32, rlhf::Precision::bf16}) {
    CAPTURE(rlhf::to_string(precision));
    auto policy = tiny_byte_policy(11, kGpu);
    auto reward = rlhf::FunctionReward(count_digits);
    rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
        policy, reward, learning_config(precision), rlhf::GPT2Tokenizer::byte_level());
    CHECK(trainer.reference()->device() == kGpu);
    std::vector<double> rewards;
    for (int i = 0; i < 30; ++i) rewards.push_back(trainer.step().reward_mean);
    const double before = (rewards[0] + rewards[1] + rewards[2]) / 3;
    const double after = (rewards[25] + rewards[26] + rewards[27] + rewards[28] + rewards[29]) / 5;
    MESSAGE("CUDA " << rlhf::to_string(precision) << " PPO: digits per 12-token sample " << before << " -> "
                    << after);
    CHECK(before < 1.0);
    CHECK(after > before + 2.5);
    CHECK_FALSE(rlhf::autocast_enabled(torch::kCUDA));
    for (const auto& p : policy->parameters()) {
      CHECK(p.is_cuda());
      CHECK((p.scalar_type() == torch::kFloat));
    }
  }
}

TEST_CASE("cuda: a PPO run resumed from save_state continues as an uninterrupted one") {
  require_gpu();
  rlhf::test::TempDir dir;
  const auto runs = rlhf::test::resume_runs(kGpu, dir.path());
  CHECK(runs.loaded_step == 2);
  for (int i = 2; i < 4; ++i) {
    // The same kernels on the same shapes: equal up to the order of atomics in cuBLAS / CUDA reductions.
    CHECK(runs.resumed[i - 2].reward_mean == runs.straight[i].reward_mean);
    CHECK(runs.resumed[i - 2].kl == doctest::Approx(runs.straight[i].kl).epsilon(1e-5));
    CHECK(runs.resumed[i - 2].policy_loss == doctest::Approx(runs.straight[i].policy_loss).epsilon(1e-5));
  }
  for (const auto& [name, value] : runs.resumed_parameters) {
    CAPTURE(name);
    CHECK(value.is_cuda());
    CHECK(max_diff(value, runs.straight_parameters.at(name)) < 1e-6);
  }
}

TEST_CASE("cuda: a LoRA policy's reference (adapters off) is its base, and PPO moves only adapters and head") {
  require_gpu();
  using LoRAModel = rlhf::GPT2<rlhf::LoRA<4, rlhf::Targets::Attention | rlhf::Targets::MLP>>;
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  torch::manual_seed(5);
  LoRAModel base(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 64, .n_embd = 32,
                                  .n_layer = 2, .n_head = 4, .bos_token_id = tokenizer.eos_id(),
                                  .eos_token_id = tokenizer.eos_id()});
  base->place(kGpu, torch::kFloat);
  rlhf::ActorCritic<LoRAModel> policy(base);
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : policy->named_parameters()) before[item.key()] = item.value().detach().clone();
  auto reward = rlhf::FunctionReward(count_digits);
  rlhf::PPOConfig config = learning_config(rlhf::Precision::bf16);
  config.total_phases = 3;
  config.base_lr = 3e-2;
  rlhf::PPOTrainer<rlhf::ActorCritic<LoRAModel>, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config,
                                                                                           tokenizer);
  CHECK(trainer.step().kl == doctest::Approx(0.0).epsilon(1e-4));  // fresh adapters: policy == reference
  CHECK(trainer.step().kl != 0);
  int adapters_changed = 0;
  for (const auto& item : policy->named_parameters()) {
    const bool same = torch::equal(item.value(), before.at(item.key()));
    if (rlhf::is_adapter_parameter(item.key())) {
      adapters_changed += !same;
    } else if (item.key().rfind("value_head.", 0) != 0) {
      CAPTURE(item.key());
      CHECK(same);
    }
  }
  CHECK(adapters_changed == 2 * 4 * 2);
}

TEST_CASE("cuda: the shift recorder's per-datum shares sum to each PPO update") {
  require_gpu();
  rlhf::test::RecordedPPO run(tiny_byte_policy(31, kGpu));
  struct Check : rlhf::StepCallback {
    std::shared_ptr<rlhf::ShiftRecorder> recorder;
    int64_t steps = 0;
    void on_step_end(const rlhf::StepInfo&) override {
      ++steps;
      REQUIRE(recorder->last_dense().size() == 28);
      for (const auto& d : recorder->last_dense()) {
        CAPTURE(d.name);
        CHECK(rlhf::test::rel_error((d.data.sum(0) + d.momentum + d.decay).cpu(), d.applied.cpu()) <
              rlhf::test::sum_tolerance(d.name));
      }
    }
  };
  auto check = std::make_shared<Check>();
  check->recorder = run.recorder;
  run.trainer.add_callback(check);
  run.trainer.step();
  CHECK(check->steps == 4);
}
