#include "test_util.hpp"
#include "ppo_fixtures.hpp"

#include <algorithm>
#include <numeric>

#include <rlhf/rlhf.hpp>

namespace {

using rlhf::test::count_digits;
using rlhf::test::tiny_byte_policy;

rlhf::PPOConfig learning_config(rlhf::KLPlacement placement) {
  auto config = rlhf::test::digit_learning_config();
  config.kl_placement = placement;
  return config;
}

}  // namespace

TEST_CASE("ppo trainer: a tiny model learns a token-count reward") {
  for (auto placement : {rlhf::KLPlacement::reward, rlhf::KLPlacement::loss}) {
    CAPTURE(static_cast<int>(placement));
    auto policy = tiny_byte_policy(11);
    auto reward = rlhf::FunctionReward(count_digits);
    rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
        policy, reward, learning_config(placement), rlhf::GPT2Tokenizer::byte_level());
    std::vector<rlhf::PhaseStats> history;
    int callbacks = 0;
    trainer.on_phase_end([&](const rlhf::PhaseStats& stats, auto&) { callbacks += stats.phase >= 0; });
    for (int i = 0; i < 30; ++i) history.push_back(trainer.step());
    auto mean_reward = [&](int from, int to) {
      double sum = 0;
      for (int i = from; i < to; ++i) sum += history[i].reward_mean;
      return sum / (to - from);
    };
    const double before = mean_reward(0, 3), after = mean_reward(25, 30);
    MESSAGE("digits per 12-token sample: " << before << " -> " << after << ", KL " << history.back().kl);
    // 10 of 257 tokens are digits: a random model writes ~0.47 per 12 tokens. Measured: 0.52 -> 3.9-4.8 (reward
    // placement) and 4.9-5.4 (loss placement) with KL 8-10 and 14-15, over kernel versions.
    CHECK(before < 1.0);
    CHECK(after > before + 2.5);
    CHECK(history.back().kl < 25.0);
    CHECK(callbacks == 30);
    CHECK(trainer.phase() == 30);
    CHECK(history.back().updates == 8);
    for (const auto& s : history) {
      CHECK(std::isfinite(s.policy_loss));
      CHECK(std::isfinite(s.value_loss));
      CHECK(s.entropy > 0);
    }
  }
}

TEST_CASE("ppo trainer: the reference stays frozen and equals the initial policy") {
  auto policy = tiny_byte_policy(5);
  std::map<std::string, torch::Tensor> initial;
  for (const auto& item : policy->base->named_parameters()) initial[item.key()] = item.value().detach().clone();
  auto reward = rlhf::FunctionReward(count_digits);
  rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::reward);
  config.total_phases = 3;
  rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::AdaptiveKL> trainer(
      policy, reward, rlhf::AdaptiveKL{{.init = 0.1, .target = 1.0, .horizon = 100}}, config,
      rlhf::GPT2Tokenizer::byte_level());
  auto stats = trainer.step();
  CHECK(stats.kl_coef == doctest::Approx(0.1));
  trainer.step();
  // The adaptive controller moved the coefficient by at most 20% x 32 / 100 per phase.
  CHECK(std::abs(trainer.kl_controller().value() - 0.1) <= 0.1 * 0.2 * 32 / 100 * 2 + 1e-12);
  bool changed = false;
  for (const auto& item : trainer.reference()->named_parameters()) {
    CHECK(torch::equal(item.value(), initial.at(item.key())));
    CHECK_FALSE(item.value().requires_grad());
    changed |= !torch::equal(policy->base->named_parameters()[item.key()], initial.at(item.key()));
  }
  CHECK(changed);
}

TEST_CASE("ppo trainer: a bf16 reference copy gives the fp32 reference's KL") {
  auto reward = rlhf::FunctionReward(count_digits);
  rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::reward);
  config.total_phases = 3;
  std::vector<double> kl;
  for (bool bf16 : {false, true}) {
    config.reference_bf16 = bf16;
    rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
        tiny_byte_policy(9), reward, config, rlhf::GPT2Tokenizer::byte_level());
    CHECK((trainer.reference()->dtype() == (bf16 ? torch::kBFloat16 : torch::kFloat)));
    trainer.step();
    kl.push_back(trainer.step().kl);  // the policy has moved: KL > 0
  }
  MESSAGE("KL with an fp32 / bf16 reference: " << kl[0] << " / " << kl[1]);
  CHECK(kl[0] > 0.01);
  CHECK(kl[1] == doctest::Approx(kl[0]).epsilon(0.1));
}

TEST_CASE("ppo trainer: old log-probs and values from the rollout equal a second forward's") {
  // The same phases twice from the same model and seeds: once taking the old log-probs and values from sampling's
  // forward passes (the default), once from a separate forward (the seed notebook's way). They differ only by
  // floating-point rounding, so every statistic and every parameter agrees to that.
  auto reward = rlhf::FunctionReward(count_digits);
  std::vector<std::vector<rlhf::PhaseStats>> runs;
  std::vector<std::map<std::string, torch::Tensor>> parameters;
  for (bool recompute : {false, true}) {
    rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::reward);
    config.recompute_old_logprobs = recompute;
    rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
        tiny_byte_policy(6), reward, config, rlhf::GPT2Tokenizer::byte_level());
    runs.emplace_back();
    for (int i = 0; i < 3; ++i) runs.back().push_back(trainer.step());
    parameters.emplace_back();
    for (const auto& item : trainer.policy()->named_parameters()) parameters.back().emplace(item.key(), item.value());
  }
  for (size_t i = 0; i < runs[0].size(); ++i) {
    const auto &reused = runs[0][i], &recomputed = runs[1][i];
    CAPTURE(i);
    CHECK(reused.reward_mean == recomputed.reward_mean);  // the same samples
    CHECK(reused.kl == doctest::Approx(recomputed.kl).epsilon(1e-4));
    CHECK(reused.policy_loss == doctest::Approx(recomputed.policy_loss).epsilon(1e-3));
    CHECK(reused.value_loss == doctest::Approx(recomputed.value_loss).epsilon(1e-4));
    CHECK(reused.explained_variance == doctest::Approx(recomputed.explained_variance).epsilon(1e-4));
    CHECK(reused.approx_kl == doctest::Approx(recomputed.approx_kl).epsilon(1e-3));
  }
  CHECK(runs[0].back().kl > 0.01);  // the policy has moved away from the reference
  double largest = 0;
  for (const auto& [name, value] : parameters[0])
    largest = std::max(largest, (value - parameters[1].at(name)).abs().max().item<double>());
  MESSAGE("largest parameter difference after 3 phases: " << largest);
  CHECK(largest < 1e-4);
}

TEST_CASE("ppo trainer: dropout stays off unless train_dropout, whatever mode the policy is left in") {
  // The model has dropout 0.1. A policy handed over in training mode (as modules start) and one put in eval mode
  // must run the same phases: neither the rollout, the reference (the policy's own base for adapter policies) nor
  // the learning forwards may use dropout when train_dropout is off.
  auto reward = rlhf::FunctionReward(count_digits);
  std::vector<std::map<std::string, torch::Tensor>> parameters;
  std::vector<double> losses;
  for (bool training : {true, false}) {
    auto policy = tiny_byte_policy(8);
    policy->train(training);
    rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::loss);
    config.total_phases = 3;
    rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
        policy, reward, config, rlhf::GPT2Tokenizer::byte_level());
    losses.push_back(trainer.step().policy_loss);
    parameters.emplace_back();
    for (const auto& item : policy->named_parameters()) parameters.back().emplace(item.key(), item.value());
  }
  CHECK(losses[0] == losses[1]);
  for (const auto& [name, value] : parameters[0]) {
    CAPTURE(name);
    CHECK(torch::equal(value, parameters[1].at(name)));
  }
}

TEST_CASE("ppo trainer: bad input is refused") {
  auto reward = rlhf::FunctionReward([](const std::string& s) { return s.empty() ? 0.0 : std::nan(""); });
  rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::reward);
  config.batch_size = 4;
  config.num_minibatches = 2;
  rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL> trainer(
      tiny_byte_policy(1), reward, config, rlhf::GPT2Tokenizer::byte_level());
  CHECK_THROWS_WITH_AS(trainer.step(), "reward: sample 0 has score nan (scores must be finite; ---> HINT: check the "
                                       "reward function for divisions by zero or log(0))",
                       rlhf::Error);
  CHECK_THROWS_WITH_AS(trainer.step({"a", "b"}), "PPOTrainer::step: got 2 prompts, PPOConfig::batch_size is 4",
                       rlhf::Error);
  auto bigger = rlhf::GPT2Policy(rlhf::GPT2<>(rlhf::GPT2Config{.vocab_size = 300, .n_positions = 64, .n_embd = 16,
                                                                .n_layer = 1, .n_head = 2}));
  CHECK_THROWS_WITH_AS((rlhf::PPOTrainer<rlhf::GPT2Policy, decltype(reward), rlhf::FixedKL>(
                           bigger, reward, config, rlhf::GPT2Tokenizer::byte_level())),
                       "PPOTrainer: the model's vocab_size (300) exceeds the tokenizer's (257): samples could hold "
                       "ids the tokenizer cannot decode for the reward ---> HINT: load the tokenizer that belongs to "
                       "the model",
                       rlhf::Error);
  config.num_minibatches = 3;
  CHECK_THROWS_WITH_AS(config.validate(), "PPOConfig: batch_size (4) must be divisible by num_minibatches (3)",
                       rlhf::Error);
  config.num_minibatches = 2;
  config.warmup_steps = 40;
  CHECK_THROWS_WITH_AS(config.validate(), "PPOConfig: warmup_steps (40) must be in [0, total_phases = 40)",
                       rlhf::Error);
}

TEST_CASE("ppo trainer: with the KL in the loss the reference's log-probs come from the learning epochs") {
  // With KLPlacement::loss the KL statistic takes the reference's log-probs of the sampled tokens from the first
  // epoch's minibatches (rows an early stop left out are projected after the epochs); with KLPlacement::reward the
  // reference stage computes them. From the same weights, phase and samples the three agree to rounding.
  auto reward = rlhf::FunctionReward(count_digits);
  using Trainer = rlhf::PPOTrainer<rlhf::ActorCritic<>, decltype(reward), rlhf::FixedKL>;
  const auto make = [&](rlhf::KLPlacement placement, bool stop_early) {
    rlhf::PPOConfig config = learning_config(placement);
    if (stop_early) config.base_lr = 5e-2, config.target_kl = 1e-6;  // the first update already stops the epochs
    return std::make_unique<Trainer>(tiny_byte_policy(4), reward, config, rlhf::GPT2Tokenizer::byte_level());
  };
  auto in_loss = make(rlhf::KLPlacement::loss, false), stopped = make(rlhf::KLPlacement::loss, true),
       in_reward = make(rlhf::KLPlacement::reward, false);
  for (auto* trainer : {in_loss.get(), stopped.get(), in_reward.get()}) trainer->step();
  {  // the policy that learned in the first phase, in all three
    torch::NoGradGuard no_grad;
    const auto learned = in_loss->policy()->named_parameters();
    for (auto* trainer : {stopped.get(), in_reward.get()}) {
      auto params = trainer->policy()->named_parameters();
      for (const auto& item : learned) params[item.key()].copy_(item.value());
    }
  }
  const auto full = in_loss->step(), partial = stopped->step(), staged = in_reward->step();
  CHECK(full.reward_mean == staged.reward_mean);  // the same samples
  CHECK(partial.reward_mean == staged.reward_mean);
  CHECK(partial.updates < stopped->config().num_minibatches);  // rows the first epoch did not reach
  MESSAGE("KL from the epochs / after an early stop / from the reference stage: " << full.kl << " / " << partial.kl
                                                                                  << " / " << staged.kl);
  CHECK(staged.kl > 1e-3);  // the policy has moved away from the reference
  CHECK(full.kl == doctest::Approx(staged.kl).epsilon(1e-4));
  CHECK(partial.kl == doctest::Approx(staged.kl).epsilon(1e-4));
}

TEST_CASE("ppo trainer: target KL stops a phase's epochs early") {
  auto reward = rlhf::FunctionReward(count_digits);
  rlhf::PPOConfig config = learning_config(rlhf::KLPlacement::reward);
  config.base_lr = 5e-2;  // large steps: the first minibatch already moves the policy far
  config.target_kl = 1e-6;
  rlhf::GPT2PPOTrainer<decltype(reward)> trainer(tiny_byte_policy(2), reward, config, rlhf::GPT2Tokenizer::byte_level());
  static_assert(std::is_same_v<decltype(trainer)::Base, rlhf::GPT2<>>);
  trainer.step();                       // warmup: lr = base_lr / 2
  auto stats = trainer.step();
  CHECK(stats.updates < config.num_minibatches * config.batches_per_learning_phase);
  CHECK(stats.updates >= 1);
  CHECK(stats.approx_kl > 1.5e-6);
}

TEST_CASE("ppo config: the learning-rate schedule warms up then decays linearly") {
  rlhf::PPOConfig config{.total_phases = 10, .warmup_steps = 4, .final_scale = 0.1};
  CHECK(config.lr_scale(0) == doctest::Approx(0.25));
  CHECK(config.lr_scale(3) == doctest::Approx(1.0));
  CHECK(config.lr_scale(4) == doctest::Approx(1.0));
  CHECK(config.lr_scale(7) == doctest::Approx(1.0 - 0.9 * 3.0 / 6.0));
  CHECK(config.lr_scale(10) == doctest::Approx(0.1));
}

TEST_CASE("ppo trainer: a run resumed from save_state continues exactly as an uninterrupted one") {
  rlhf::test::TempDir dir;
  const auto runs = rlhf::test::resume_runs(torch::kCPU, dir.path());
  CHECK(runs.loaded_step == 2);
  for (int i = 2; i < 4; ++i) {
    const auto& stats = runs.resumed[i - 2];
    const auto& expected = runs.straight[i];
    CHECK(stats.phase == i);
    CHECK(stats.reward_mean == expected.reward_mean);
    CHECK(stats.kl == expected.kl);
    CHECK(stats.kl_coef == expected.kl_coef);
    CHECK(stats.policy_loss == expected.policy_loss);
    CHECK(stats.value_loss == expected.value_loss);
  }
  for (const auto& [name, value] : runs.resumed_parameters)
    CHECK(torch::equal(value, runs.straight_parameters.at(name)));

  // A state from another architecture is refused, naming the tensor.
  auto other = rlhf::ActorCritic<>(rlhf::GPT2<>(rlhf::GPT2Config{.vocab_size = 257, .n_positions = 64, .n_embd = 16,
                                                                  .n_layer = 2, .n_head = 2}));
  rlhf::test::ResumeTrainer wrong(other, rlhf::FunctionReward(&count_digits), rlhf::test::resume_config(),
                                  rlhf::GPT2Tokenizer::byte_level());
  CHECK_THROWS_WITH_AS(wrong.load_state(dir.path()),
                       fmt::format("checkpoint: {}: tensor 'base.transformer.h.0.attn.c_attn.bias' has shape [96], "
                                   "the model expects [48]",
                                   (dir / "policy.safetensors").string())
                           .c_str(),
                       rlhf::Error);
}

TEST_CASE("ppo trainer: the fused token statistics give the updates of the logits() path") {
  // A capture on the output projection makes the trainer take logits() and policy_token_stats; without one it takes
  // projected_token_stats. Both must train alike, with the KL in the loss, a temperature and either precision.
  struct Counting : rlhf::ForwardCapture {
    int64_t calls = 0;  // under autograd: the minibatch forwards, not sampling's
    void on_forward(const torch::Tensor&, const torch::Tensor&) override { calls += torch::GradMode::is_enabled(); }
  };
  /// The gradients of the first update, after clipping.
  struct FirstGradients : rlhf::StepCallback {
    rlhf::test::ResumeTrainer* trainer = nullptr;
    std::map<std::string, torch::Tensor> grads;
    void on_gradients(const rlhf::StepInfo& info) override {
      if (info.step != 0) return;
      for (const auto& item : trainer->policy()->named_parameters())
        if (item.value().grad().defined()) grads.emplace(item.key(), item.value().grad().clone());
    }
  };
  rlhf::test::RestoreDecodeIsa restore;
  for (const auto& [isa, precision] : {std::pair{rlhf::DecodeIsa::avx512_bf16, rlhf::Precision::fp32},
                                       {rlhf::DecodeIsa::avx512_bf16, rlhf::Precision::bf16},
                                       {rlhf::DecodeIsa::avx2, rlhf::Precision::bf16}}) {
    rlhf::set_decode_isa(isa);  // avx2: torch's products and softmax statistics
    CAPTURE(isa == rlhf::DecodeIsa::avx2);
    CAPTURE(precision == rlhf::Precision::bf16);
    auto config = rlhf::test::resume_config();
    config.kl_placement = rlhf::KLPlacement::loss;
    config.temperature = 0.9;
    config.precision = precision;
    std::vector<std::map<std::string, torch::Tensor>> after, first;
    std::vector<rlhf::PhaseStats> stats;
    Counting counting;
    for (const bool fused : {true, false}) {
      auto trainer = rlhf::test::resume_trainer(torch::kCPU, config);
      auto gradients = std::make_shared<FirstGradients>();
      gradients->trainer = &trainer;
      trainer.add_callback(gradients);
      if (!fused) trainer.policy()->base->transformer->head_capture = &counting;
      stats.push_back(trainer.step());
      stats.push_back(trainer.step());
      trainer.policy()->base->transformer->head_capture = nullptr;
      std::map<std::string, torch::Tensor> parameters;
      for (const auto& item : trainer.policy()->named_parameters()) parameters.emplace(item.key(), item.value());
      after.push_back(parameters);
      first.push_back(gradients->grads);
    }
    CHECK(counting.calls == 2 * 2 * 2);  // the logits() path: 2 phases x 2 epochs x 2 minibatches
    REQUIRE(first[0].size() == first[1].size());
    const auto probe = torch::empty({0});
    if (precision == rlhf::Precision::bf16 && !rlhf::gemm_bf16_supported({&probe})) {
      // torch runs the bf16 products: the logits() path rounds the logits' gradient to bf16 in torch's backward and
      // multiplies in bf16, the fused node multiplies the rounded gradient in fp32. The first update's gradients
      // agree to bf16's precision; AdamW's normalised steps then carry such differences into the parameters.
      for (const auto& [name, grad] : first[0]) {
        CAPTURE(name);
        const auto& other = first[1].at(name);
        CHECK((grad - other).abs().max().item<double>() <= 0.02 * other.abs().max().item<double>() + 1e-7);
      }
      continue;
    }
    // On the library's kernels: the same products and gradients, so the same training.
    CHECK(stats[1].kl_loss != 0.0);
    CHECK(stats[1].kl_loss == doctest::Approx(stats[3].kl_loss).epsilon(1e-5));
    CHECK(stats[1].entropy == doctest::Approx(stats[3].entropy).epsilon(1e-5));
    for (const auto& [name, value] : after[0]) {
      CAPTURE(name);
      CHECK((value - after[1].at(name)).abs().max().item<double>() <= 1e-6);
    }
  }
}

TEST_CASE("ppo trainer: the rollout's log-probs on the kernels equal torch's, and a token out of range is refused") {
  auto policy = rlhf::test::tiny_byte_policy(5);
  torch::NoGradGuard no_grad;
  auto& base = *policy->base;
  auto hidden = base.forward(torch::randint(0, 257, {5, 9}), torch::ones({5, 9}, torch::kLong));  // [5, 9, D]
  auto tokens = torch::randint(0, 257, {5, 9});
  // Two rows per chunk, temperature 0.7; torch's log-softmax of the same logits is the reference.
  auto expected = torch::log_softmax(base.logits(hidden) / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1);
  rlhf::test::RestoreDecodeIsa restore;
  for (const auto isa : {rlhf::DecodeIsa::avx512_bf16, rlhf::DecodeIsa::avx2}) {
    rlhf::set_decode_isa(isa);
    auto got = rlhf::detail::chunked_logprobs(base, hidden, tokens, 0.7, 2);
    CHECK((got - expected).abs().max().item<double>() < 1e-5);
    auto bad = tokens.clone();
    bad[3][4] = 257;
    CHECK_THROWS_AS(rlhf::detail::chunked_logprobs(base, hidden, bad, 0.7, 2), std::exception);
  }
  rlhf::set_decode_kernels(true);
  if (!rlhf::detail::avx512_supported()) return;  // torch's gather refused the tokens above with its own message
  CHECK_THROWS_WITH_AS(rlhf::detail::chunked_logprobs(base, hidden, tokens.masked_fill(tokens.eq(tokens[0][0]), -1),
                                                      0.7, 2),
                       "chunked_logprobs: token ids must lie in [0, 257) (the vocabulary of the logits), found -1",
                       rlhf::Error);
}
