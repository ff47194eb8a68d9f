#include "test_util.hpp"
#include "ppo_fixtures.hpp"

#include <algorithm>

#include <rlhf/rlhf.hpp>

namespace {

rlhf::GPT2Policy small_policy() {
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  torch::manual_seed(21);
  return rlhf::GPT2Policy(rlhf::GPT2<>(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 64,
                                                        .n_embd = 32, .n_layer = 2, .n_head = 4}));
}

using rlhf::test::count_digits;

}  // namespace

TEST_CASE("freeze: parameter depths of GPT-2 names") {
  CHECK(rlhf::gpt2_depth("transformer.wte.weight", 12) == 0);
  CHECK(rlhf::gpt2_depth("transformer.wpe.weight", 12) == 0);
  CHECK(rlhf::gpt2_depth("transformer.h.0.ln_1.weight", 12) == 1);
  CHECK(rlhf::gpt2_depth("transformer.h.11.mlp.c_fc.lora_A", 12) == 12);
  CHECK(rlhf::gpt2_depth("transformer.ln_f.bias", 12) == 13);
}

TEST_CASE("freeze: frozen embeddings and first blocks keep their values under PPO; per-layer learning rates") {
  auto policy = small_policy();
  std::map<std::string, torch::Tensor> before;
  for (const auto& item : policy->base->named_parameters()) before[item.key()] = item.value().detach().clone();
  auto reward = rlhf::FunctionReward(count_digits);
  rlhf::PPOConfig config{.seed = 2, .total_phases = 10, .batch_size = 8, .num_minibatches = 2, .base_lr = 1e-2,
                         .head_lr = 4e-3, .warmup_steps = 2, .gen_len = 6, .top_k = 0, .prefix = "n",
                         .kl_placement = rlhf::KLPlacement::reward, .freeze = {.embeddings = true, .first_blocks = 1},
                         .layer_lr_decay = 0.5};
  rlhf::PPOTrainer<rlhf::GPT2Policy, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config,
                                                                              rlhf::GPT2Tokenizer::byte_level());
  // The optimiser holds exactly the trainable parameters: block 1, ln_f and the value head.
  int64_t in_optimizer = 0, trainable = 0;
  for (const auto& group : trainer.optimizer().param_groups())
    for (const auto& p : group.params()) in_optimizer += p.numel();
  for (const auto& p : policy->parameters())
    if (p.requires_grad()) trainable += p.numel();
  CHECK(in_optimizer == trainable);
  CHECK(trainer.optimizer().param_groups().size() == 3);  // block 1, ln_f, value head

  trainer.step();
  // Phase 0 of a 2-phase warmup runs at half the peak rates: block 1 at base_lr x 0.5, ln_f at base_lr.
  const auto& groups = trainer.optimizer().param_groups();
  auto lr = [&](size_t i) { return static_cast<const torch::optim::AdamWOptions&>(groups[i].options()).lr(); };
  CHECK(lr(0) == doctest::Approx(1e-2 * 0.5 * 0.5));
  CHECK(lr(1) == doctest::Approx(1e-2 * 0.5));
  CHECK(lr(2) == doctest::Approx(4e-3 * 0.5));
  trainer.step();

  for (const auto& item : policy->base->named_parameters()) {
    const int64_t depth = rlhf::gpt2_depth(item.key(), 2);
    CAPTURE(item.key());
    if (depth <= 1) {
      CHECK(torch::equal(item.value(), before.at(item.key())));
      CHECK_FALSE(item.value().requires_grad());
    } else if (item.key().find("weight") != std::string::npos) {
      CHECK_FALSE(torch::equal(item.value(), before.at(item.key())));
    }
  }
  CHECK_THROWS_WITH_AS(rlhf::freeze(*policy->base, {.first_blocks = 3}),
                       "FreezeOptions: first_blocks (3) must be in [0, n_layer = 2]", rlhf::Error);
}
