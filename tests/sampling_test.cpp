#include "test_util.hpp"

#include <rlhf/generation/sampling.hpp>
#include <rlhf/model/gpt2.hpp>

namespace {

rlhf::GPT2<> sampling_model(uint64_t seed = 7) {
  rlhf::GPT2Config c;
  c.vocab_size = 29;
  c.n_positions = 32;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.initializer_range = 0.3;  // peaked next-token distributions, so truncation matters
  torch::manual_seed(seed);
  return rlhf::GPT2<>(c);
}

/// Log-softmax of the full (no-cache) forward over the generated positions, at temperature t: [B, G].
torch::Tensor full_forward_logprobs(rlhf::GPT2<>& model, const rlhf::Generation& gen, double t) {
  torch::NoGradGuard no_grad;
  auto hidden = model->forward(gen.ids, gen.attention_mask);
  const int64_t p = gen.prompt_length, g = gen.ids.size(1) - p;
  auto logits = model->logits(hidden.narrow(1, p - 1, g)) / t;  // [B, G, V]
  return logits.log_softmax(-1).gather(-1, gen.new_tokens().unsqueeze(-1)).squeeze(-1);
}

}  // namespace

TEST_CASE("generate: seeded, cached sampling consistent with the full forward") {
  auto model = sampling_model();
  auto prompts = torch::tensor({{0, 0, 3, 4, 5}, {7, 8, 9, 10, 11}}, torch::kLong);
  auto mask = torch::tensor({{0, 0, 1, 1, 1}, {1, 1, 1, 1, 1}}, torch::kLong);
  rlhf::SamplingConfig config{.max_new_tokens = 8, .temperature = 0.7, .top_k = 5, .seed = 42};
  auto gen = rlhf::generate(*model, prompts, mask, config);
  CHECK(gen.ids.sizes() == torch::IntArrayRef({2, 13}));
  CHECK(torch::equal(gen.ids.narrow(1, 0, 5), prompts));
  CHECK(gen.logprobs.sizes() == torch::IntArrayRef({2, 8}));
  CHECK(model->is_training());  // the training flag is restored

  SUBCASE("same seed, same samples; other seed, other samples") {
    CHECK(torch::equal(rlhf::generate(*model, prompts, mask, config).ids, gen.ids));
    config.seed = 43;
    CHECK_FALSE(torch::equal(rlhf::generate(*model, prompts, mask, config).ids, gen.ids));
  }
  SUBCASE("log-probs are those of the temperature-scaled full forward") {
    model->eval();
    CHECK((gen.logprobs - full_forward_logprobs(model, gen, 0.7)).abs().max().item<float>() < 1e-5);
    // Under top-k truncation the sampled distribution is renormalised: its log-probs are larger.
    CHECK((gen.sampling_logprobs >= gen.logprobs - 1e-6).all().item<bool>());
  }
  SUBCASE("the step observer sees the full forward's final-layernorm outputs of the predicting positions") {
    std::vector<int64_t> steps;
    std::vector<torch::Tensor> seen;  // [B, D] per step
    auto observed = rlhf::generate(*model, prompts, mask, config, [&](int64_t step, const torch::Tensor& hidden) {
      steps.push_back(step);
      seen.push_back(hidden.clone());
    });
    CHECK(torch::equal(observed.ids, gen.ids));  // observing changes nothing
    CHECK(steps == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
    model->eval();
    torch::NoGradGuard no_grad;
    auto full = model->forward(gen.ids, gen.attention_mask).narrow(1, 4, 8);  // positions P - 1 ... P + G - 2
    CHECK((torch::stack(seen, 1) - full).abs().max().item<float>() < 1e-5);
  }
  SUBCASE("a padded row samples what it samples alone") {
    config.top_k = 1;  // greedy: independent of the random draws of the other row
    auto together = rlhf::generate(*model, prompts, mask, config);
    auto alone = rlhf::generate(*model, torch::tensor({{3, 4, 5}}, torch::kLong), {}, config);
    CHECK(torch::equal(together.new_tokens()[0], alone.new_tokens()[0]));
  }
}

TEST_CASE("generate: greedy, top-k = 1 and tiny top-p agree") {
  auto model = sampling_model(8);
  auto prompts = torch::tensor({{1, 2, 3}, {4, 5, 6}}, torch::kLong);
  auto greedy = rlhf::generate(*model, prompts, {}, {.max_new_tokens = 6, .temperature = 0.0});
  auto top1 = rlhf::generate(*model, prompts, {}, {.max_new_tokens = 6, .top_k = 1, .seed = 3});
  auto nucleus = rlhf::generate(*model, prompts, {}, {.max_new_tokens = 6, .top_k = 0, .top_p = 1e-6, .seed = 4});
  CHECK(torch::equal(greedy.ids, top1.ids));
  CHECK(torch::equal(greedy.ids, nucleus.ids));
  // Greedy step by step with the full forward.
  torch::NoGradGuard no_grad;
  model->eval();
  auto ids = prompts;
  for (int i = 0; i < 6; ++i) {
    auto next = model->logits(model->forward(ids).select(1, ids.size(1) - 1)).argmax(-1, true);
    ids = torch::cat({ids, next}, 1);
  }
  CHECK(torch::equal(ids, greedy.ids));
}

TEST_CASE("generate: the sampled frequencies follow the truncated distribution") {
  auto model = sampling_model(9);
  model->eval();
  auto prompt = torch::tensor({{2, 3}}, torch::kLong);
  torch::Tensor probs;
  {
    torch::NoGradGuard no_grad;
    auto logits = model->logits(model->forward(prompt).select(1, 1))[0] / 1.3;  // [V]
    auto [top, idx] = logits.topk(4);
    probs = torch::zeros({29});
    probs.index_put_({idx}, torch::softmax(top, 0));
  }
  // 4000 independent first tokens in one batch.
  const int64_t n = 4000;
  auto gen = rlhf::generate(*model, prompt.expand({n, 2}).contiguous(), {},
                            {.max_new_tokens = 1, .temperature = 1.3, .top_k = 4, .seed = 11});
  auto counts = torch::bincount(gen.new_tokens().squeeze(1), {}, 29).to(torch::kFloat) / n;
  CHECK((counts - probs).abs().max().item<float>() < 0.03);
  CHECK((counts.masked_select(probs.eq(0)) == 0).all().item<bool>());
}

TEST_CASE("generate: top-p keeps the smallest set reaching p") {
  auto scaled = torch::tensor({{std::log(0.5), std::log(0.3), std::log(0.15), std::log(0.05)}});
  // p = 0.7: {0.5, 0.3} reach it; the draw must never pick index 2 or 3.
  for (float u : {0.0f, 0.3f, 0.61f, 0.99f, 0.999999f}) {
    auto [token, lp] = rlhf::detail::draw_token(scaled, torch::tensor({u}), 0, 0.7);
    CHECK(token.item<int64_t>() == (u < 0.5f / 0.8f ? 0 : 1));
    CHECK(lp.item<float>() == doctest::Approx(std::log(token.item<int64_t>() == 0 ? 0.625 : 0.375)).epsilon(1e-5));
  }
}

TEST_CASE("top_k_rows: the k largest of each row, as torch's topk") {
  if (!rlhf::detail::avx512_supported()) return;  // the kernel's CPU; draw_token then takes torch's topk
  torch::manual_seed(5);
  // widths around the 16-lane vectors (tails of 1 .. 15), k from 1 to the whole row
  for (int64_t n : {1, 7, 16, 17, 50, 333}) {
    for (int64_t k : {int64_t{1}, std::min<int64_t>(n, 3), std::min<int64_t>(n, 10), n}) {
      auto x = torch::randn({6, n});
      auto top = rlhf::detail::top_k_rows(x, k);
      REQUIRE(top.has_value());
      auto [values, indices] = x.topk(k, -1, /*largest=*/true, /*sorted=*/true);
      CHECK(torch::equal(top->first, values));
      CHECK(torch::equal(top->second, indices));
    }
  }
  // rising rows (every entry displaces the k-th), -inf entries (counted, as torch does) and ties (lower index first)
  auto rising = torch::arange(1000, torch::kFloat).unsqueeze(0);
  auto top = rlhf::detail::top_k_rows(rising, 5);
  REQUIRE(top.has_value());
  CHECK(torch::equal(top->second, torch::arange(999, 994, -1, torch::kLong).unsqueeze(0)));
  const float inf = std::numeric_limits<float>::infinity();
  auto masked = torch::tensor({{-inf, 2.0f, -inf, -inf, 1.0f, 2.0f}});
  top = rlhf::detail::top_k_rows(masked, 4);
  REQUIRE(top.has_value());
  CHECK(torch::equal(top->first, torch::tensor({{2.0f, 2.0f, 1.0f, -inf}})));
  CHECK(torch::equal(top->second, torch::tensor({{int64_t{1}, int64_t{5}, int64_t{4}, int64_t{0}}})));
  // a NaN anywhere in a row: no answer (torch's topk ranks NaN first; draw_token defers to it)
  for (int64_t at : {0, 2, 40}) {
    auto x = torch::randn({3, 41});
    x[1][at] = std::numeric_limits<float>::quiet_NaN();
    CHECK_FALSE(rlhf::detail::top_k_rows(x, 3).has_value());
  }
  // operands the kernel does not take
  CHECK_FALSE(rlhf::detail::top_k_rows(torch::randn({2, 30}).to(torch::kBFloat16), 3).has_value());
  CHECK_FALSE(rlhf::detail::top_k_rows(torch::randn({30, 2}).t(), 3).has_value());
  CHECK_FALSE(rlhf::detail::top_k_rows(torch::randn({2, 5}), 6).has_value());
  // a batch large enough to be split among threads
  auto big = torch::randn({40, 30000});
  top = rlhf::detail::top_k_rows(big, 10);
  REQUIRE(top.has_value());
  auto [values, indices] = big.topk(10, -1);
  CHECK(torch::equal(top->first, values));
  CHECK(torch::equal(top->second, indices));
}

TEST_CASE("generate: stop at EOS") {
  auto model = sampling_model(10);
  auto prompts = torch::tensor({{1, 2}, {3, 4}, {5, 6}}, torch::kLong);
  // Make token 7 the EOS and likely: ln_f's output then always has sum 16 * 0.25, so token 7's logit is 5.
  rlhf::SamplingConfig config{.max_new_tokens = 10, .top_k = 0, .stop_at_eos = true, .eos_id = 7, .pad_id = 0,
                              .seed = 5};
  {
    torch::NoGradGuard no_grad;
    model->transformer->ln_f->bias.fill_(0.25);
    model->transformer->wte->weight[7].fill_(1.25);
  }
  auto gen = rlhf::generate(*model, prompts, {}, config);
  auto tokens = gen.new_tokens();
  for (int64_t row = 0; row < 3; ++row) {
    bool ended = false;
    for (int64_t j = 0; j < tokens.size(1); ++j) {
      const auto live = gen.generated_mask[row][j].item<int64_t>();
      CHECK(live == (ended ? 0 : 1));
      if (ended) {
        CHECK(tokens[row][j].item<int64_t>() == 0);
        CHECK(gen.logprobs[row][j].item<float>() == 0.0f);
      }
      if (tokens[row][j].item<int64_t>() == 7 && !ended) ended = true;
    }
  }
  CHECK(gen.generated_mask.sum().item<int64_t>() < 30);  // some row ended early
  CHECK_THROWS_WITH_AS(rlhf::generate(*model, prompts, {}, {.max_new_tokens = 40}),
                       "generate: prompt length 2 + max_new_tokens 40 exceeds the model's n_positions = 32",
                       rlhf::Error);
  CHECK_THROWS_WITH_AS(rlhf::generate(*model, prompts, {}, {.top_p = 0.0}),
                       "SamplingConfig: top_p must be in (0, 1], got 0", rlhf::Error);
}

TEST_CASE("generate packs the weights once per call, or once while the caller keeps a DecodePackScope open") {
  auto model = sampling_model(12);
  auto ids = torch::randint(0, 29, {2, 4}, torch::kLong);
  rlhf::AutocastScope autocast(rlhf::Precision::bf16, torch::kCPU);
  const rlhf::SamplingConfig sampling{.max_new_tokens = 3, .seed = 5};
  const auto& w = model->transformer->blocks[0]->attn->c_attn->weight;
  const bool bf16_kernels = rlhf::decode_isa() >= rlhf::DecodeIsa::avx512_bf16;
  const auto alone = rlhf::generate(*model, ids, {}, sampling);  // its own scope, closed on return
  CHECK_FALSE(rlhf::DecodePackScope::active());
  rlhf::Generation changed;
  {
    rlhf::DecodePackScope packs;
    const auto first = rlhf::generate(*model, ids, {}, sampling);
    const int64_t bytes = packs.bytes();
    CHECK((bytes > 0) == bf16_kernels);  // the call packed into the open scope
    const void* packed = bf16_kernels ? packs.pairs(w, false).data_ptr() : nullptr;
    const auto second = rlhf::generate(*model, ids, {}, sampling);
    CHECK(packs.bytes() == bytes);
    if (bf16_kernels) CHECK(packs.pairs(w, false).data_ptr() == packed);  // not packed again
    for (const auto* g : {&first, &second}) {
      CHECK(torch::equal(g->ids, alone.ids));
      CHECK(torch::equal(g->logprobs, alone.logprobs));
    }
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.mul_(1.5);  // changed in place: packed again
    changed = rlhf::generate(*model, ids, {}, sampling);
  }
  const auto fresh = rlhf::generate(*model, ids, {}, sampling);
  CHECK_FALSE(torch::equal(fresh.logprobs, alone.logprobs));
  CHECK(torch::equal(changed.ids, fresh.ids));
  CHECK(torch::equal(changed.logprobs, fresh.logprobs));
}
