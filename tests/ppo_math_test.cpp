#include "test_util.hpp"

#include <rlhf/core/advantages.hpp>
#include <rlhf/core/logprobs.hpp>
#include <rlhf/core/masked.hpp>
#include <rlhf/core/precision.hpp>
#include <rlhf/core/projected_stats.hpp>
#include <rlhf/core/softmax_stats.hpp>
#include <rlhf/ppo/kl.hpp>
#include <rlhf/ppo/losses.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

using doctest::Approx;

namespace {

torch::Tensor f32(std::vector<std::vector<double>> rows) {
  std::vector<torch::Tensor> r;
  for (const auto& row : rows) r.push_back(torch::tensor(row, torch::kDouble));
  return torch::stack(r).to(torch::kFloat);
}

double item_at(const torch::Tensor& t, int64_t i, int64_t j) { return t.index({i, j}).item<double>(); }

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

/// Contiguous masks of the given lengths, [B, T] int64 (response tokens first, right padding after).
torch::Tensor length_mask(const std::vector<int64_t>& lengths, int64_t T) {
  auto m = torch::zeros({static_cast<int64_t>(lengths.size()), T}, torch::kLong);
  for (size_t b = 0; b < lengths.size(); ++b) m[static_cast<int64_t>(b)].narrow(0, 0, lengths[b]).fill_(1);
  return m;
}

}  // namespace

// ---- masked statistics ----

TEST_CASE("ppo masked_mean / masked_var over the valid elements") {
  auto x = f32({{1, 2, 3}, {4, 5, 6}});
  // Valid elements 1, 2, 4.
  for (auto mask : {torch::tensor({{1, 1, 0}, {1, 0, 0}}, torch::kLong), torch::tensor({{1, 1, 0}, {1, 0, 0}}).to(torch::kBool),
                    f32({{1, 1, 0}, {1, 0, 0}}), f32({{2.5, -1, 0}, {7, 0, 0}})}) {  // nonzero = valid
    CAPTURE(mask);
    CHECK(rlhf::masked_mean(x, mask).item<double>() == Approx(7.0 / 3.0));  // (1 + 2 + 4) / 3
    auto per_row = rlhf::masked_mean(x, mask, 1);                            // [(1 + 2) / 2, 4 / 1]
    REQUIRE(per_row.sizes() == torch::IntArrayRef({2}));
    CHECK(per_row[0].item<double>() == Approx(1.5));
    CHECK(per_row[1].item<double>() == Approx(4.0));
    // deviations from 7/3: -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    CHECK(rlhf::masked_var(x, mask, false).item<double>() == Approx(42.0 / 9.0 / 3.0));       // 14/9
    CHECK(rlhf::masked_var(x, mask).item<double>() == Approx(42.0 / 9.0 / 3.0 * 3.0 / 2.0));  // 7/3
  }

  SUBCASE("masked-out NaN neither leaks into the value nor into the gradient") {
    auto y = x.clone();
    y.index_put_({0, 2}, std::numeric_limits<float>::quiet_NaN());
    y.requires_grad_(true);
    auto mask = torch::tensor({{1, 1, 0}, {1, 0, 0}});
    auto mean = rlhf::masked_mean(y, mask);
    CHECK(mean.item<double>() == Approx(7.0 / 3.0));
    CHECK(rlhf::masked_var(y, mask).item<double>() == Approx(7.0 / 3.0));
    mean.backward();
    CHECK(max_abs_diff(y.grad(), f32({{1.0 / 3, 1.0 / 3, 0}, {1.0 / 3, 0, 0}})) < 1e-7);
  }
  SUBCASE("a bool x is averaged as a fraction") {
    CHECK(rlhf::masked_mean(x.gt(1.5), torch::ones({2, 3})).item<double>() == Approx(5.0 / 6.0));
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::masked_var(x, torch::tensor({{0, 0, 1}, {0, 0, 0}})),
                         "masked_var: an unbiased variance needs at least 2 valid elements, the mask has 1 ---> HINT: a "
                         "minibatch of one short response has too few tokens; use larger minibatches or a biased "
                         "variance",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::masked_mean(x, torch::ones({2, 4})),
                         "masked_mean: mask has shape [2, 4], x has shape [2, 3]; they must match", rlhf::Error);
    // A biased variance of one element is 0.
    CHECK(rlhf::masked_var(x, torch::tensor({{0, 0, 1}, {0, 0, 0}}), false).item<double>() == 0.0);
  }
}

TEST_CASE("ppo masked_whiten") {
  SUBCASE("by hand") {
    auto x = f32({{1, 2, 3}, {4, 5, 6}});
    auto mask = torch::tensor({{1, 1, 0}, {1, 0, 0}});
    // mean 7/3, unbiased var 7/3, sd = sqrt(7/3 + 1e-8) = 1.5275252...; (1 - 7/3) / sd = -0.8728716, ...
    auto w = rlhf::masked_whiten(x, mask);
    CHECK(item_at(w, 0, 0) == Approx(-0.8728715591));
    CHECK(item_at(w, 0, 1) == Approx(-0.2182178898));
    CHECK(item_at(w, 1, 0) == Approx(1.0910894488));
    CHECK(item_at(w, 0, 2) == 3.0);  // masked-out entries are returned unchanged
    CHECK(item_at(w, 1, 1) == 5.0);
    CHECK(item_at(w, 1, 2) == 6.0);
    // shift_mean = false adds the mean 7/3 back: -0.8728716 + 2.3333333 = 1.4604618, ...
    auto s = rlhf::masked_whiten(x, mask, false);
    CHECK(item_at(s, 0, 0) == Approx(1.4604617743));
    CHECK(item_at(s, 0, 1) == Approx(2.1151154436));
    CHECK(item_at(s, 1, 0) == Approx(3.4244227822));
    CHECK(item_at(s, 1, 2) == 6.0);
  }
  SUBCASE("random rows of uneven length: mean 0 and unbiased variance 1 over the mask") {
    torch::manual_seed(3);
    auto mask = length_mask({9, 5, 2, 7}, 9);
    auto x = (torch::randn({4, 9}) * 3 + 5).masked_fill(mask.eq(0), 1000.0);
    auto w = rlhf::masked_whiten(x, mask);
    CHECK(std::abs(rlhf::masked_mean(w, mask).item<double>()) < 1e-5);
    CHECK(rlhf::masked_var(w, mask).item<double>() == Approx(1.0).epsilon(1e-5));
    CHECK(torch::equal(w.masked_select(mask.eq(0)), x.masked_select(mask.eq(0))));
    // Whitening is invariant under a positive affine map of x.
    CHECK(max_abs_diff(rlhf::masked_whiten(x * 2 - 7, mask).masked_select(mask.ne(0)), w.masked_select(mask.ne(0))) <
          1e-5);
  }
}

// ---- advantages ----

TEST_CASE("ppo gae by hand, with uneven rows") {
  // gamma 0.9, lambda 0.5, gamma * lambda = 0.45.
  // Row 0, all valid: r = [0, 0, 1], V = [0.5, 0.6, 0.7]
  //   t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3                     A2 = 0.3
  //   t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03                   A1 = 0.03 + 0.45 * 0.3 = 0.165
  //   t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04                   A0 = 0.04 + 0.45 * 0.165 = 0.11425
  //   returns = A + V = [0.61425, 0.765, 1.0]
  // Row 1, length 2 (right padding with garbage reward 55 and value 99): r = [0, 1], V = [0.5, 0.6]
  //   t=1: delta = 1 + 0.9 * 0 - 0.6 = 0.4 (V beyond the row's end is 0)   A1 = 0.4
  //   t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04                              A0 = 0.04 + 0.45 * 0.4 = 0.22
  //   returns = [0.72, 1.0, 0]
  // Row 2, left padding (garbage 7 / 9 at t=0): r = [_, 0, 1], V = [_, 0.6, 0.7]
  //   t=2: 0.3; t=1: 0.03 + 0.45 * 0.3 = 0.165; t=0 masked: 0. returns = [0, 0.765, 1.0]
  auto rewards = f32({{0, 0, 1}, {0, 1, 55}, {7, 0, 1}});
  auto values = f32({{0.5, 0.6, 0.7}, {0.5, 0.6, 99}, {9, 0.6, 0.7}});
  auto mask = torch::tensor({{1, 1, 1}, {1, 1, 0}, {0, 1, 1}});
  auto out = rlhf::gae(rewards, values, mask, 0.9, 0.5);
  CHECK(max_abs_diff(out.advantages, f32({{0.11425, 0.165, 0.3}, {0.22, 0.4, 0}, {0, 0.165, 0.3}})) < 1e-6);
  CHECK(max_abs_diff(out.returns, f32({{0.61425, 0.765, 1.0}, {0.72, 1.0, 0}, {0, 0.765, 1.0}})) < 1e-6);
  CHECK_FALSE(out.advantages.requires_grad());

  SUBCASE("a masked position inside a row ends the recursion") {
    // Row [1, 0, 1] with r = [0, 5, 1], V = [0.5, 5, 0.7]: t=2: 1 - 0.7 = 0.3; t=1 masked: 0;
    // t=0: 0 + 0.9 * 0 - 0.5 = -0.5 (nothing crosses the hole).
    auto o = rlhf::gae(f32({{0, 5, 1}}), f32({{0.5, 5, 0.7}}), torch::tensor({{1, 0, 1}}), 0.9, 0.5);
    CHECK(max_abs_diff(o.advantages, f32({{-0.5, 0, 0.3}})) < 1e-6);
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::gae(rewards, values, mask, 1.5, 0.5), "gae: gamma must lie in [0, 1], got 1.5",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::gae(rewards, values, mask, 0.9, -0.1), "gae: lambda must lie in [0, 1], got -0.1",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::gae(rewards.narrow(1, 0, 2), values, mask, 0.9, 0.5),
                         "gae: rewards has shape [3, 2], values has shape [3, 3]; they must match", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::gae(rewards[0], values[0], mask[0], 0.9, 0.5), "gae: values must be [B, T], got [3]",
                         rlhf::Error);
  }
}

TEST_CASE("ppo gae equals a naive double loop for general gamma and lambda") {
  torch::manual_seed(11);
  const int64_t B = 5, T = 8;
  const std::vector<int64_t> lengths = {8, 3, 1, 6, 7};
  auto mask = length_mask(lengths, T);
  auto rewards = torch::randn({B, T}, torch::kDouble);
  auto values = torch::randn({B, T}, torch::kDouble);
  for (auto [gamma, lambda] : std::vector<std::pair<double, double>>{{0.95, 0.9}, {1.0, 1.0}, {0.5, 0.0}, {0.0, 0.7}}) {
    CAPTURE(gamma);
    CAPTURE(lambda);
    auto out = rlhf::gae(rewards, values, mask, gamma, lambda);
    auto r = rewards.accessor<double, 2>();
    auto v = values.accessor<double, 2>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t end = lengths[static_cast<size_t>(b)];  // positions [0, end) are valid
      std::vector<double> expected(static_cast<size_t>(T), 0.0);
      for (int64_t t = 0; t < end; ++t) {
        // A_t = sum_{l >= 0} (gamma lambda)^l delta_{t+l}, the sum stopping at the row's end.
        double a = 0.0, weight = 1.0;
        for (int64_t k = t; k < end; ++k) {
          const double next = k + 1 < end ? v[b][k + 1] : 0.0;
          a += weight * (r[b][k] + gamma * next - v[b][k]);
          weight *= gamma * lambda;
        }
        expected[static_cast<size_t>(t)] = a;
      }
      for (int64_t t = 0; t < T; ++t) {
        CHECK(item_at(out.advantages, b, t) == Approx(expected[static_cast<size_t>(t)]).epsilon(1e-10));
        CHECK(item_at(out.returns, b, t) == Approx(t < end ? expected[static_cast<size_t>(t)] + v[b][t] : 0.0)
                                           .epsilon(1e-10));
      }
    }
  }
}

TEST_CASE("ppo one_step_advantages (the seed notebook's) equals gae(gamma = 1, lambda = 0)") {
  // values [B = 2, S = 5], prefix_len = 2, G = 3 generated tokens, one reward per sequence.
  auto values = f32({{0.1, 0.2, 0.3, 0.4, 0.5}, {1, -1, 2, 0, 3}});
  auto rewards = torch::tensor({1.0, -0.5}, torch::kFloat);
  // Row 0: one-step = [V2, V3, r] = [0.3, 0.4, 1.0], zero-step = [V1, V2, V3] = [0.2, 0.3, 0.4] -> [0.1, 0.1, 0.6]
  // Row 1: one-step = [2, 0, -0.5], zero-step = [-1, 2, 0] -> [3, -2, -0.5]
  auto one_step = rlhf::one_step_advantages(values, rewards, 2);
  CHECK(max_abs_diff(one_step, f32({{0.1, 0.1, 0.6}, {3, -2, -0.5}})) < 1e-6);

  // The same through gae: per-token rewards zero but the score at the last position, values of the states that
  // predict the generated tokens (values[:, prefix_len - 1 : -1]), every position valid.
  auto token_rewards = torch::zeros({2, 3});
  token_rewards.select(1, 2).copy_(rewards);
  auto token_values = values.narrow(1, 1, 3);
  auto out = rlhf::gae(token_rewards, token_values, torch::ones({2, 3}), 1.0, 0.0);
  CHECK(max_abs_diff(out.advantages, one_step) < 1e-6);
  // The seed's returns, advantages + values[:, -gen_len - 1 : -1], are gae's.
  CHECK(max_abs_diff(out.returns, one_step + values.narrow(1, 1, 3)) < 1e-6);

  SUBCASE("where they differ: a row that ended early") {
    // gae bootstraps 0 after the last valid token; the seed (no mask) would bootstrap from the padding's value.
    auto mask = torch::tensor({{1, 1, 1}, {1, 1, 0}});
    auto short_rewards = token_rewards.clone();
    short_rewards.index_put_({1, 1}, -0.5);  // the score moves to the row's last token
    auto o = rlhf::gae(short_rewards, token_values, mask, 1.0, 0.0);
    CHECK(item_at(o.advantages, 1, 1) == Approx(-0.5 - 2.0));  // r - V = -0.5 - 2, not V_next - V = 0 - 2
    CHECK(item_at(o.advantages, 1, 2) == 0.0);
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::one_step_advantages(values, rewards, 5),
                         "one_step_advantages: prefix_len must lie in [1, 5) for sequences of length 5, got 5",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::one_step_advantages(values, torch::zeros({3}), 2),
                         "one_step_advantages: rewards must be [B] = [2], got [3]", rlhf::Error);
  }
}

// ---- log-probabilities and entropy ----

TEST_CASE("ppo gather_logprobs and entropy_from_logits by hand") {
  // Row [1, 2, 3]: logsumexp = 3 + log(1 + e^-1 + e^-2) = 3.4076060; p = [0.0900306, 0.2447285, 0.6652410]
  //   log p(token 2) = 3 - 3.4076060 = -0.4076060
  //   entropy = -sum p log p = 0.0900306 * 2.4076060 + 0.2447285 * 1.4076060 + 0.6652410 * 0.4076060 = 0.8323956
  // Row [0, 0, 0]: log p = -log 3 = -1.0986123, entropy = log 3 = 1.0986123
  auto logits = f32({{1, 2, 3}, {0, 0, 0}}).unsqueeze(0).requires_grad_(true);  // [1, 2, 3]
  auto tokens = torch::tensor({{2, 1}});                                          // [1, 2]
  auto lp = rlhf::gather_logprobs(logits, tokens);
  REQUIRE(lp.sizes() == torch::IntArrayRef({1, 2}));
  CHECK(item_at(lp, 0, 0) == Approx(-0.4076059644));
  CHECK(item_at(lp, 0, 1) == Approx(-1.0986122887));
  auto ent = rlhf::entropy_from_logits(logits);
  REQUIRE(ent.sizes() == torch::IntArrayRef({1, 2}));
  CHECK(item_at(ent, 0, 0) == Approx(0.8323955818));
  CHECK(item_at(ent, 0, 1) == Approx(1.0986122887));

  SUBCASE("gradient of log p(token) is onehot - softmax") {
    lp[0][0].backward();
    CHECK(max_abs_diff(logits.grad()[0][0], torch::tensor({-0.0900305732, -0.2447284711, 0.3347590442})) < 1e-6);
    CHECK(logits.grad()[0][1].abs().max().item<double>() == 0.0);
  }
  SUBCASE("a -inf logit (masked vocabulary) keeps entropy and gradient finite") {
    auto masked = f32({{0, 0, -std::numeric_limits<double>::infinity()}}).requires_grad_(true);
    auto h = rlhf::entropy_from_logits(masked);
    CHECK(h.item<double>() == Approx(std::log(2.0)));
    h.sum().backward();
    CHECK(torch::isfinite(masked.grad()).all().item<bool>());
  }
  SUBCASE("reduced-precision logits give float32 results of the rounded values") {
    torch::manual_seed(5);
    auto big = (torch::randn({3, 4, 11}) * 4).to(torch::kBFloat16);
    auto toks = torch::randint(0, 11, {3, 4});
    auto lp16 = rlhf::gather_logprobs(big, toks);
    CHECK((lp16.scalar_type() == torch::kFloat));
    auto ref = torch::log_softmax(big.to(torch::kFloat), -1).gather(-1, toks.unsqueeze(-1)).squeeze(-1);
    CHECK(max_abs_diff(lp16, ref) < 1e-5);
    auto ent16 = rlhf::entropy_from_logits(big);
    auto lsm = torch::log_softmax(big.to(torch::kFloat), -1);
    CHECK(max_abs_diff(ent16, -(lsm.exp() * lsm).sum(-1)) < 1e-5);
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::gather_logprobs(logits, torch::tensor({{3, 0}})),
                         "gather_logprobs: token ids must lie in [0, 3) (the vocabulary of the logits), found 3",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::gather_logprobs(logits, torch::tensor({2, 1})),
                         "gather_logprobs: tokens must have the shape of logits without the vocabulary dimension, "
                         "[1, 2]; got [2]",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::gather_logprobs(logits, torch::zeros({1, 2})),
                         "gather_logprobs: tokens must be an integer tensor, got Float", rlhf::Error);
  }
}

TEST_CASE("ppo policy_token_stats: the values and gradients of the separate log-softmax computations") {
  torch::manual_seed(23);
  const double temperature = 0.7;
  // V = 5000 and 1100 rows: several row chunks of kChunkElements.
  auto logits_init = torch::randn({2, 550, 5000}, torch::kDouble) * 3;
  auto ref = torch::randn({2, 550, 5000}, torch::kDouble) * 3;
  auto tokens = torch::randint(0, 5000, {2, 550});
  auto w_lp = torch::randn({2, 550}, torch::kDouble), w_ent = torch::randn({2, 550}, torch::kDouble),
       w_kl = torch::randn({2, 550}, torch::kDouble);
  for (const bool with_ref : {true, false}) {
    CAPTURE(with_ref);
    // Reference: autograd through log_softmax, as the seed notebook computes the three terms.
    auto x = logits_init.clone().requires_grad_(true);
    auto lsm = torch::log_softmax(x / temperature, -1);
    auto lp = lsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1);
    auto ent = -(lsm.exp() * lsm).sum(-1);
    auto kl = with_ref ? (lsm.exp() * (lsm - torch::log_softmax(ref / temperature, -1))).sum(-1)
                       : torch::zeros_like(lp);
    ((lp * w_lp).sum() + (ent * w_ent).sum() + (kl * w_kl).sum()).backward();

    auto y = logits_init.clone().requires_grad_(true);
    auto stats = rlhf::policy_token_stats(y, tokens, temperature, with_ref ? ref : torch::Tensor());
    REQUIRE(stats.logprobs.sizes() == torch::IntArrayRef({2, 550}));
    CHECK(max_abs_diff(stats.logprobs, lp) < 1e-10);
    CHECK(max_abs_diff(stats.entropy, ent) < 1e-10);
    CHECK(max_abs_diff(stats.kl, kl) < 1e-10);
    ((stats.logprobs * w_lp).sum() + (stats.entropy * w_ent).sum() + (stats.kl * w_kl).sum()).backward();
    CHECK(max_abs_diff(y.grad(), x.grad()) < 1e-12);
  }
  SUBCASE("one output's gradient alone; float32 and bfloat16 logits") {
    auto exact = logits_init.clone().requires_grad_(true);  // the entropy's gradient in double precision
    auto lsm = torch::log_softmax(exact, -1);
    (-(lsm.exp() * lsm).sum(-1)).sum().backward();
    auto x = logits_init.to(torch::kFloat).requires_grad_(true);
    rlhf::policy_token_stats(x, tokens).entropy.sum().backward();
    // The closed form in float32 is within 1e-5 of it (3e-6 measured; autograd through entropy_from_logits in
    // float32 is within 4e-5), for gradients up to 1.4.
    CHECK(max_abs_diff(x.grad(), exact.grad()) < 1e-5);
    auto low = logits_init.to(torch::kBFloat16);
    auto stats = rlhf::policy_token_stats(low, tokens, 1.0, ref.to(torch::kBFloat16));
    CHECK((stats.kl.scalar_type() == torch::kFloat));
    CHECK(max_abs_diff(stats.kl, rlhf::full_kl(low.to(torch::kFloat), ref.to(torch::kBFloat16).to(torch::kFloat))) <
          1e-4);
  }
  SUBCASE("a masked vocabulary keeps values and gradients finite") {
    const double inf = std::numeric_limits<double>::infinity();
    auto masked = torch::tensor({{0.0, 0.0, -inf}}, torch::kDouble).requires_grad_(true);
    auto stats = rlhf::policy_token_stats(masked, torch::tensor({1}), 1.0, torch::zeros({1, 3}, torch::kDouble));
    CHECK(stats.entropy.item<double>() == Approx(std::log(2.0)));
    CHECK(stats.kl.item<double>() == Approx(std::log(1.5)));
    (stats.logprobs + stats.entropy + stats.kl).sum().backward();
    CHECK(torch::isfinite(masked.grad()).all().item<bool>());
    CHECK(masked.grad()[0][2].item<double>() == 0.0);
  }
  SUBCASE("errors") {
    auto l = torch::zeros({2, 3});
    CHECK_THROWS_WITH_AS(rlhf::policy_token_stats(l, torch::tensor({0, 3})),
                         "policy_token_stats: token ids must lie in [0, 3) (the vocabulary of the logits), found 3",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::policy_token_stats(l, torch::tensor({0})),
                         "policy_token_stats: tokens must be [2] (logits without the vocabulary dimension), got [1]",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::policy_token_stats(l, torch::tensor({0, 1}), 1.0, torch::zeros({2, 4})),
                         "policy_token_stats: ref_logits must have the shape of logits [2, 3], got [2, 4]",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::policy_token_stats(l, torch::tensor({0, 1}), 0.0),
                         "policy_token_stats: temperature must be positive and finite, got 0", rlhf::Error);
    auto x = torch::zeros({2, 3}, torch::kDouble).requires_grad_(true);
    auto s = rlhf::policy_token_stats(x, torch::tensor({0, 1}));
    CHECK_THROWS_WITH_AS(
        torch::autograd::grad({s.entropy.sum()}, {x}, {}, true, /*create_graph=*/true),
        doctest::Contains("policy_token_stats: double backward (create_graph = true) is not supported"),
        std::exception);
  }
}

/// Runs `f` with the softmax-statistics kernels (where the CPU has AVX-512) and with torch's operators (the kernels
/// capped below AVX-512 by set_decode_isa()).
template <class F>
void with_and_without_kernels(const F& f) {
  rlhf::test::RestoreDecodeIsa restore;
  for (const auto isa : {rlhf::DecodeIsa::avx512_bf16, rlhf::DecodeIsa::avx2}) {
    rlhf::set_decode_isa(isa);
    const bool kernels = rlhf::detail::avx512_supported() && isa == rlhf::DecodeIsa::avx512_bf16;
    CAPTURE(kernels);
    f(kernels);
  }
}

/// Logits [37, 1007] (a 15-wide tail after the 16-wide vectors; two threads share the rows) with 20% of the entries
/// masked to -inf (top-k style), reference logits masking a subset of them (the KL stays finite), and taken tokens
/// among the unmasked entries, as sampled ones are.
struct MaskedLogits {
  torch::Tensor logits, ref, mask, tokens;
  MaskedLogits() {
    torch::manual_seed(29);
    const double inf = std::numeric_limits<double>::infinity();
    logits = torch::randn({37, 1007}, torch::kDouble) * 3;
    ref = logits + torch::randn({37, 1007}, torch::kDouble);
    mask = torch::rand({37, 1007}) < 0.2;
    logits.masked_fill_(mask, -inf);
    ref.masked_fill_(mask.logical_and(torch::rand({37, 1007}) < 0.5), -inf);
    tokens = torch::multinomial(mask.logical_not().to(torch::kFloat), 1).squeeze(1);
  }
};

TEST_CASE("ppo policy_token_stats: fp32 and bf16 logits against float64, with and without the AVX-512 kernels") {
  const MaskedLogits data;
  const double temperature = 0.7;
  auto w_lp = torch::randn({37}, torch::kDouble), w_ent = torch::randn({37}, torch::kDouble),
       w_kl = torch::randn({37}, torch::kDouble);
  with_and_without_kernels([&](bool kernels) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      for (const bool with_ref : {true, false}) {
        CAPTURE(dtype);
        CAPTURE(with_ref);
        auto x = data.logits.to(dtype).requires_grad_(true);
        auto ref = with_ref ? data.ref.to(dtype) : torch::Tensor();
        CHECK(rlhf::detail::softmax_stats_kernels_apply(x, with_ref ? ref : torch::empty({0}, x.options())) ==
              kernels);
        // float64 on the same (rounded) values: the exact statistics and gradient
        auto xd = x.detach().to(torch::kDouble).requires_grad_(true);
        auto exact = rlhf::policy_token_stats(xd, data.tokens, temperature,
                                              with_ref ? ref.to(torch::kDouble) : torch::Tensor());
        ((exact.logprobs * w_lp).sum() + (exact.entropy * w_ent).sum() + (exact.kl * w_kl).sum()).backward();

        auto stats = rlhf::policy_token_stats(x, data.tokens, temperature, ref);
        CHECK((stats.logprobs.scalar_type() == torch::kFloat));
        CHECK(max_abs_diff(stats.logprobs, exact.logprobs) < 1e-5);
        CHECK(max_abs_diff(stats.entropy, exact.entropy) < 1e-5);
        CHECK(max_abs_diff(stats.kl, exact.kl) < 1e-5);
        // log q(token), without gradient: log_softmax of the reference logits / temperature at the token
        CHECK(stats.ref_logprobs.defined() == with_ref);
        if (with_ref) {
          CHECK_FALSE(stats.ref_logprobs.requires_grad());
          CHECK(max_abs_diff(stats.ref_logprobs, exact.ref_logprobs) < 1e-5);
          CHECK(max_abs_diff(exact.ref_logprobs,
                             torch::log_softmax(ref.to(torch::kDouble) / temperature, -1)
                                 .gather(-1, data.tokens.unsqueeze(-1))
                                 .squeeze(-1)) < 1e-12);
        }
        ((stats.logprobs * w_lp.to(torch::kFloat)).sum() + (stats.entropy * w_ent.to(torch::kFloat)).sum() +
         (stats.kl * w_kl.to(torch::kFloat)).sum())
            .backward();
        auto grad = x.grad().to(torch::kDouble);
        CHECK((x.grad().scalar_type() == dtype));
        // fp32: float arithmetic (3.5e-6 measured, for gradients up to 4.2); bf16: the exact gradient rounded,
        // within half a bf16 step
        const double rel = dtype == torch::kBFloat16 ? std::ldexp(1.0, -8) : 0.0;
        INFO("max gradient error ", max_abs_diff(grad, xd.grad()), " scale ", xd.grad().abs().max().item<double>());
        CHECK(((grad - xd.grad()).abs() <= xd.grad().abs() * rel + 1e-5).all().item<bool>());
        CHECK((grad.masked_select(data.mask) == 0).all().item<bool>());  // p = 0: no gradient
      }
    }
  });
}

TEST_CASE("ppo policy_token_stats: a NaN logit makes its row NaN, a NaN reference logit only that row's KL") {
  const MaskedLogits data;
  auto x = data.logits.to(torch::kFloat), ref = data.ref.to(torch::kFloat);
  x[3][100] = std::numeric_limits<float>::quiet_NaN();
  ref[5][7] = std::numeric_limits<float>::quiet_NaN();
  with_and_without_kernels([&](bool) {
    auto xg = x.clone().requires_grad_(true);
    auto stats = rlhf::policy_token_stats(xg, data.tokens, 1.0, ref);
    auto clean = rlhf::policy_token_stats(data.logits.to(torch::kFloat), data.tokens, 1.0, data.ref.to(torch::kFloat));
    for (const auto& [got, want] : {std::pair{stats.logprobs, clean.logprobs}, {stats.entropy, clean.entropy}}) {
      CHECK(std::isnan(got[3].item<float>()));
      CHECK(std::isfinite(got[5].item<float>()));
      CHECK(max_abs_diff(got.narrow(0, 4, 33), want.narrow(0, 4, 33)) == 0.0);
    }
    CHECK(std::isnan(stats.kl[3].item<float>()));
    CHECK(std::isnan(stats.kl[5].item<float>()));
    CHECK(max_abs_diff(stats.kl.narrow(0, 6, 31), clean.kl.narrow(0, 6, 31)) == 0.0);
    (stats.logprobs.narrow(0, 0, 4).sum() + stats.kl.narrow(0, 4, 2).sum()).backward();
    CHECK(torch::isnan(xg.grad()[3]).all().item<bool>());
    CHECK(torch::isnan(xg.grad()[5]).all().item<bool>());
    CHECK(torch::isfinite(xg.grad()[4]).all().item<bool>());
    CHECK((xg.grad().narrow(0, 6, 31) == 0).all().item<bool>());
  });
}

/// Gradients of a weighted sum of PPO's three token statistics with respect to the hidden states and the projection.
struct ProjectedGrads {
  rlhf::PolicyTokenStats stats;
  torch::Tensor d_hidden, d_weight;
};

/// The statistics of hidden [N, D] through weight [V, D], and their gradients, either by the fused node
/// (projected_token_stats) or as GPT2Impl::logits() then policy_token_stats compute them; bf16 runs the products
/// under bf16 autocast.
ProjectedGrads projected_grads(bool fused, bool bf16, const torch::Tensor& hidden0, const torch::Tensor& weight0,
                               const torch::Tensor& tokens, double temperature, const torch::Tensor& ref_hidden,
                               const torch::Tensor& ref_weight, const torch::Tensor& w_lp, const torch::Tensor& w_ent,
                               const torch::Tensor& w_kl) {
  auto hidden = hidden0.clone().requires_grad_(true), weight = weight0.clone().requires_grad_(true);
  ProjectedGrads out;
  {
    rlhf::AutocastScope autocast(bf16 ? rlhf::Precision::bf16 : rlhf::Precision::fp32, torch::kCPU);
    if (fused) {
      out.stats = rlhf::projected_token_stats(hidden, weight, tokens, temperature, ref_hidden, ref_weight);
    } else {
      auto logits = rlhf::linear_mm_nt(hidden, weight).to(torch::kFloat);
      torch::Tensor ref;
      if (ref_hidden.defined()) {
        torch::NoGradGuard no_grad;
        ref = rlhf::linear_mm_nt(ref_hidden, ref_weight).to(torch::kFloat);
      }
      out.stats = rlhf::policy_token_stats(logits, tokens, temperature, ref);
    }
  }
  ((out.stats.logprobs * w_lp).sum() + (out.stats.entropy * w_ent).sum() + (out.stats.kl * w_kl).sum()).backward();
  out.d_hidden = hidden.grad();
  out.d_weight = weight.grad();
  return out;
}

TEST_CASE("ppo projected_token_stats: the statistics and gradients of policy_token_stats of the projected logits") {
  torch::manual_seed(41);
  const int64_t N = 45, D = 24, V = 1013;  // V: a 5-wide tail after the 16-wide vectors
  const double temperature = 0.8;
  auto hidden = torch::randn({N, D}), weight = torch::randn({V, D}) * 0.3;
  auto ref_hidden = hidden + 0.3 * torch::randn({N, D}), ref_weight = weight + 0.05 * torch::randn({V, D});
  auto tokens = torch::randint(0, V, {N});
  auto w_lp = torch::randn({N}), w_ent = torch::randn({N}), w_kl = torch::randn({N});
  with_and_without_kernels([&](bool kernels) {
    for (const bool bf16 : {false, true}) {
      for (const bool with_ref : {true, false}) {
        CAPTURE(bf16);
        CAPTURE(with_ref);
        auto rh = with_ref ? ref_hidden : torch::Tensor(), rw = with_ref ? ref_weight : torch::Tensor();
        auto fused = projected_grads(true, bf16, hidden, weight, tokens, temperature, rh, rw, w_lp, w_ent, w_kl);
        auto plain = projected_grads(false, bf16, hidden, weight, tokens, temperature, rh, rw, w_lp, w_ent, w_kl);
        CHECK((fused.d_hidden.scalar_type() == torch::kFloat));
        CHECK((fused.d_weight.scalar_type() == torch::kFloat));
        // The same logits (bf16 ones read as the fp32 copy holds them), so the same statistics.
        CHECK(max_abs_diff(fused.stats.logprobs, plain.stats.logprobs) == 0.0);
        CHECK(max_abs_diff(fused.stats.entropy, plain.stats.entropy) == 0.0);
        CHECK(max_abs_diff(fused.stats.kl, plain.stats.kl) == 0.0);
        if (!with_ref) CHECK((fused.stats.kl == 0).all().item<bool>());
        CHECK(fused.stats.ref_logprobs.defined() == with_ref);
        if (with_ref) CHECK(max_abs_diff(fused.stats.ref_logprobs, plain.stats.ref_logprobs) == 0.0);
        // fp32, and bf16 on the kernels: the same gradient of the logits (the bf16 one rounded as the product's
        // packing rounds it) through the same products. bf16 without the kernels: torch's bf16 products on one
        // side, fp32 products of the bf16 gradient on the other.
        const double tol = bf16 && !kernels ? 1e-2 : 0.0;
        INFO("d_hidden ", max_abs_diff(fused.d_hidden, plain.d_hidden), " d_weight ",
             max_abs_diff(fused.d_weight, plain.d_weight));
        CHECK(max_abs_diff(fused.d_hidden, plain.d_hidden) <= tol * plain.d_hidden.abs().max().item<double>());
        CHECK(max_abs_diff(fused.d_weight, plain.d_weight) <= tol * plain.d_weight.abs().max().item<double>());
      }
    }
  });
  SUBCASE("[B, T, D] hidden states, a frozen projection, no rows") {
    auto h = hidden.reshape({5, 9, D}).clone().requires_grad_(true);
    auto stats = rlhf::projected_token_stats(h, weight, tokens.reshape({5, 9}), temperature);
    REQUIRE(stats.logprobs.sizes() == torch::IntArrayRef({5, 9}));
    auto plain = rlhf::policy_token_stats(rlhf::linear_mm_nt(hidden, weight), tokens, temperature);
    CHECK(max_abs_diff(stats.entropy.reshape({N}), plain.entropy) == 0.0);
    stats.logprobs.sum().backward();
    CHECK(h.grad().sizes() == h.sizes());
    CHECK(h.grad().abs().sum().item<double>() > 0);
    auto none = rlhf::projected_token_stats(torch::zeros({0, D}), weight, torch::zeros({0}, torch::kLong));
    CHECK(none.logprobs.numel() == 0);
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::projected_token_stats(hidden, weight, tokens.narrow(0, 0, 3)),
                         "projected_token_stats: tokens must be [45] (hidden without its last dimension), got [3]",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::projected_token_stats(hidden.narrow(1, 0, 5), weight, tokens),
                         "projected_token_stats: hidden must be [..., 24] (D of weight [1013, 24]), got [45, 5]",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::projected_token_stats(hidden, weight, tokens, 1.0, ref_hidden),
                         "projected_token_stats: ref_weight must have the shape of weight [1013, 24] when ref_hidden "
                         "is given, got an undefined tensor",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::projected_token_stats(hidden, weight, tokens, 1.0, {}, ref_weight),
                         "projected_token_stats: ref_weight was given without ref_hidden (the reference's hidden "
                         "states)",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::projected_token_stats(hidden, weight, torch::full({N}, V)),
                         "projected_token_stats: token ids must lie in [0, 1013) (the vocabulary of the logits), "
                         "found 1013",
                         rlhf::Error);
    auto h = hidden.clone().requires_grad_(true);
    auto stats = rlhf::projected_token_stats(h, weight, tokens);
    stats.entropy.sum().backward({}, /*retain_graph=*/true);
    CHECK_THROWS_WITH_AS(stats.entropy.sum().backward(),
                         doctest::Contains("projected_token_stats: a second backward pass through the same "
                                           "statistics (retain_graph = true) is not supported"),
                         std::exception);
    auto again = rlhf::projected_token_stats(h, weight, tokens);
    CHECK_THROWS_WITH_AS(torch::autograd::grad({again.entropy.sum()}, {h}, {}, true, /*create_graph=*/true),
                         doctest::Contains("projected_token_stats: double backward (create_graph = true) is not "
                                           "supported"),
                         std::exception);
  }
}

TEST_CASE("ppo token_stats_chunked: same values and gradients as the unchunked computation") {
  torch::manual_seed(17);
  const int64_t N = 10, D = 4, V = 7;
  const double temperature = 0.7;
  torch::nn::Linear head(torch::nn::LinearOptions(D, V));
  head->to(torch::kDouble);
  auto hidden_init = torch::randn({N, D}, torch::kDouble);
  auto tokens = torch::randint(0, V, {N});
  auto w_lp = torch::randn({N}, torch::kDouble);   // arbitrary weights of a scalar loss
  auto w_ent = torch::randn({N}, torch::kDouble);

  int64_t calls = 0, most_rows = 0;
  auto project = [&](const torch::Tensor& h) {
    ++calls;
    most_rows = std::max(most_rows, h.size(0));
    return head(h);
  };

  // Reference: the full [N, V] logits, log_softmax directly.
  auto reference = [&](bool hidden_grad) {
    for (auto& p : head->parameters()) p.mutable_grad() = torch::Tensor();
    auto hidden = hidden_init.clone().requires_grad_(hidden_grad);
    auto logits = head(hidden) / temperature;
    auto lsm = torch::log_softmax(logits, -1);
    auto lp = lsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1);
    auto ent = -(lsm.exp() * lsm).sum(-1);
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward();
    return std::vector<torch::Tensor>{lp.detach(), ent.detach(), hidden_grad ? hidden.grad() : torch::Tensor(),
                                      head->weight.grad().clone(), head->bias.grad().clone()};
  };
  auto chunked = [&](bool hidden_grad, int64_t chunk_rows) {
    for (auto& p : head->parameters()) p.mutable_grad() = torch::Tensor();
    auto hidden = hidden_init.clone().requires_grad_(hidden_grad);
    auto stats = rlhf::token_stats_chunked(hidden, project, tokens, temperature, chunk_rows);
    ((stats.logprobs * w_lp).sum() + (stats.entropy * w_ent).sum()).backward();
    return std::vector<torch::Tensor>{stats.logprobs.detach(), stats.entropy.detach(),
                                      hidden_grad ? hidden.grad() : torch::Tensor(), head->weight.grad().clone(),
                                      head->bias.grad().clone()};
  };

  for (int64_t chunk_rows : {3, 1, 10, 64}) {
    CAPTURE(chunk_rows);
    for (bool hidden_grad : {true, false}) {
      CAPTURE(hidden_grad);
      auto want = reference(hidden_grad);
      calls = most_rows = 0;
      auto got = chunked(hidden_grad, chunk_rows);
      CHECK(most_rows <= std::max<int64_t>(chunk_rows, 1));  // never more than chunk_rows logits rows at once
      for (size_t i = 0; i < want.size(); ++i) {
        CAPTURE(i);
        if (!want[i].defined()) continue;
        REQUIRE(got[i].defined());
        CHECK(max_abs_diff(got[i], want[i]) < 1e-10);
      }
      // gather_logprobs / entropy_from_logits on the full logits agree too.
      auto logits = head(hidden_init) / temperature;
      CHECK(max_abs_diff(rlhf::gather_logprobs(logits, tokens), want[0]) < 1e-10);
      CHECK(max_abs_diff(rlhf::entropy_from_logits(logits), want[1]) < 1e-10);
    }
  }

  SUBCASE("without gradients") {
    torch::NoGradGuard no_grad;
    auto stats = rlhf::token_stats_chunked(hidden_init, project, tokens, temperature, 4);
    CHECK_FALSE(stats.logprobs.requires_grad());
    auto logits = head(hidden_init) / temperature;
    CHECK(max_abs_diff(stats.logprobs, rlhf::gather_logprobs(logits, tokens)) < 1e-12);
    CHECK(max_abs_diff(stats.entropy, rlhf::entropy_from_logits(logits)) < 1e-12);
  }
  SUBCASE("float32 hidden states and a float32 head") {
    head->to(torch::kFloat);
    auto hidden = hidden_init.to(torch::kFloat).requires_grad_(true);
    auto stats = rlhf::token_stats_chunked(hidden, project, tokens, 1.0, 3);
    CHECK((stats.logprobs.scalar_type() == torch::kFloat));
    stats.logprobs.sum().backward();
    auto h2 = hidden_init.to(torch::kFloat).requires_grad_(true);
    rlhf::gather_logprobs(head(h2), tokens).sum().backward();
    CHECK(max_abs_diff(hidden.grad(), h2.grad()) < 1e-5);
  }
  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(rlhf::token_stats_chunked(hidden_init, project, tokens, 0.0, 3),
                         "token_stats_chunked: temperature must be positive and finite, got 0", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::token_stats_chunked(hidden_init, project, tokens, 1.0, 0),
                         "token_stats_chunked: chunk_rows must be at least 1, got 0", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::token_stats_chunked(hidden_init, project, tokens.narrow(0, 0, 9), 1.0, 3),
                         "token_stats_chunked: tokens must be [N] = [10], got [9]", rlhf::Error);
    const std::string range_message =
        "token_stats_chunked: token ids must lie in [0, 7) (the vocabulary of the logits), found " +
        std::to_string((tokens + V)[0].item<int64_t>());
    CHECK_THROWS_WITH_AS(rlhf::token_stats_chunked(hidden_init, project, tokens + V, 1.0, 3), range_message.c_str(),
                         rlhf::Error);
    auto bad = [&](const torch::Tensor& h) { return head(h).unsqueeze(0); };
    CHECK_THROWS_WITH_AS(rlhf::token_stats_chunked(hidden_init, bad, tokens, 1.0, 3),
                         "token_stats_chunked: project must map [n, D] to [n, V]; for 1 row it returned [1, 1, 7]",
                         rlhf::Error);
  }
}

// ---- KL ----

TEST_CASE("ppo kl_per_token estimators by hand") {
  auto logp = f32({{-1.0, -2.0}});
  auto ref = f32({{-1.5, -1.0}});
  // logp - ref = [0.5, -1.0]; d = ref - logp = [-0.5, 1.0]
  // k1 = [0.5, -1.0]; k2 = 0.5 * [0.25, 1.0] = [0.125, 0.5]
  // k3 = (e^d - 1) - d = [0.6065307 - 1 + 0.5, 2.7182818 - 1 - 1] = [0.1065307, 0.7182818]
  CHECK(max_abs_diff(rlhf::kl_per_token(logp, ref, rlhf::KLEstimator::k1), f32({{0.5, -1.0}})) < 1e-7);
  CHECK(max_abs_diff(rlhf::kl_per_token(logp, ref, rlhf::KLEstimator::k2), f32({{0.125, 0.5}})) < 1e-7);
  CHECK(max_abs_diff(rlhf::kl_per_token(logp, ref, rlhf::KLEstimator::k3), f32({{0.1065306597, 0.7182818285}})) <
        1e-6);
  CHECK_THROWS_WITH_AS(rlhf::kl_per_token(logp, ref.t(), rlhf::KLEstimator::k1),
                       "kl_per_token: ref_logp has shape [2, 1], logp has shape [1, 2]; they must match", rlhf::Error);

  SUBCASE("k1 and k3 are unbiased estimates of the exact KL") {
    // p = softmax([1, 2, 3]), q = uniform: KL(p || q) = log 3 - H(p) = 1.0986123 - 0.8323956 = 0.2662167
    auto logits = torch::tensor({1.0, 2.0, 3.0}, torch::kDouble);
    auto log_p = torch::log_softmax(logits, -1);
    torch::manual_seed(23);
    auto samples = torch::multinomial(log_p.exp(), 200000, true);  // [S] x ~ p
    auto lp = log_p.index_select(0, samples);
    auto lq = torch::full_like(lp, -std::log(3.0));
    const double exact = rlhf::full_kl(logits, torch::zeros({3}, torch::kDouble)).item<double>();
    CHECK(exact == Approx(0.2662167068));
    CHECK(rlhf::kl_per_token(lp, lq, rlhf::KLEstimator::k1).mean().item<double>() == Approx(exact).epsilon(0.02));
    CHECK(rlhf::kl_per_token(lp, lq, rlhf::KLEstimator::k3).mean().item<double>() == Approx(exact).epsilon(0.02));
  }
}

TEST_CASE("ppo full_kl against a direct sum over the vocabulary") {
  torch::manual_seed(29);
  auto logits = torch::randn({2, 3, 5}, torch::kDouble).requires_grad_(true);
  auto ref = torch::randn({2, 3, 5}, torch::kDouble);
  auto kl = rlhf::full_kl(logits, ref);
  REQUIRE(kl.sizes() == torch::IntArrayRef({2, 3}));
  auto l = logits.detach();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 3; ++t) {
      double zp = 0, zq = 0;
      for (int64_t v = 0; v < 5; ++v) {
        zp += std::exp(l[b][t][v].item<double>());
        zq += std::exp(ref[b][t][v].item<double>());
      }
      double sum = 0;
      for (int64_t v = 0; v < 5; ++v) {
        const double p = std::exp(l[b][t][v].item<double>()) / zp, q = std::exp(ref[b][t][v].item<double>()) / zq;
        sum += p * std::log(p / q);
      }
      CHECK(item_at(kl, b, t) == Approx(sum).epsilon(1e-12));
    }
  SUBCASE("the seed's calc_kl_penalty and a masked vocabulary") {
    // The seed: probs * (log_probs - ref_log_probs), summed over the vocabulary.
    auto lp = torch::log_softmax(l, -1), lq = torch::log_softmax(ref, -1);
    CHECK(max_abs_diff(kl, (lp.exp() * (lp - lq)).sum(-1)) < 1e-12);
    // p = [0.5, 0.5, 0] against uniform q: KL = log(0.5 / (1/3)) = log 1.5 = 0.4054651, gradient finite.
    auto masked = torch::tensor({0.0, 0.0, -std::numeric_limits<double>::infinity()}, torch::kDouble)
                      .requires_grad_(true);
    auto k = rlhf::full_kl(masked, torch::zeros({3}, torch::kDouble));
    CHECK(k.item<double>() == Approx(std::log(1.5)));
    k.backward();
    CHECK(torch::isfinite(masked.grad()).all().item<bool>());
  }
  SUBCASE("gradient against autograd through the direct formula") {
    kl.sum().backward();
    auto g = logits.grad().clone();
    auto x = l.clone().requires_grad_(true);
    auto lp = torch::log_softmax(x, -1), lq = torch::log_softmax(ref, -1);
    (lp.exp() * (lp - lq)).sum().backward();
    CHECK(max_abs_diff(g, x.grad()) < 1e-12);
  }
}

// ---- KL controllers ----

namespace {
struct NoUpdate {
  double value() const { return 0.0; }
};
}  // namespace

TEST_CASE("ppo KL controllers") {
  static_assert(rlhf::KLController<rlhf::FixedKL>);
  static_assert(rlhf::KLController<rlhf::AdaptiveKL>);
  static_assert(!rlhf::KLController<NoUpdate>);
  static_assert(!rlhf::KLController<double>);

  SUBCASE("FixedKL") {
    rlhf::FixedKL fixed{{.coef = 0.1}};
    fixed.update(100.0, 1000);
    CHECK(fixed.value() == 0.1);
    CHECK(rlhf::FixedKL{}.value() == 0.2);
    rlhf::FixedKL restored;
    restored.load_state(fixed.state());
    CHECK(restored.value() == 0.1);
    CHECK_THROWS_WITH_AS(rlhf::FixedKL({.coef = -1.0}),
                         "FixedKL: Options.coef must be a finite non-negative number, got -1", rlhf::Error);
    CHECK_THROWS_WITH_AS(restored.load_state(nlohmann::json{{"kind", "fixed"}}),
                         "FixedKL::load_state: field 'coef' is missing or not a number in {\"kind\":\"fixed\"}",
                         rlhf::Error);
  }
  SUBCASE("AdaptiveKL: the sequence of coefficients by hand") {
    rlhf::AdaptiveKL kl{{.init = 0.2, .target = 6.0, .horizon = 10000}};
    CHECK(kl.value() == 0.2);
    // kl 9:   error = clip(9/6 - 1 = 0.5) = 0.2;   beta = 0.2 * (1 + 0.2 * 256/10000) = 0.2 * 1.00512 = 0.201024
    kl.update(9.0, 256);
    CHECK(kl.value() == Approx(0.201024).epsilon(1e-12));
    // kl 6.6: error = 0.1;    beta = 0.201024 * (1 + 0.1 * 0.0256) = 0.201024 * 1.00256 = 0.20153862144
    kl.update(6.6, 256);
    CHECK(kl.value() == Approx(0.20153862144).epsilon(1e-12));
    // kl 3:   error = clip(-0.5) = -0.2; beta = 0.20153862144 * (1 - 0.2 * 0.0512) = * 0.98976 = 0.199474865956454
    kl.update(3.0, 512);
    CHECK(kl.value() == Approx(0.199474865956454).epsilon(1e-12));
    // kl 6:   error = 0;      unchanged
    kl.update(6.0, 1000);
    CHECK(kl.value() == Approx(0.199474865956454).epsilon(1e-12));
    // kl 0:   error = clip(-1) = -0.2; beta = 0.199474865956454 * (1 - 0.2 * 0.01) = * 0.998 = 0.199075916224541
    kl.update(0.0, 100);
    CHECK(kl.value() == Approx(0.199075916224541).epsilon(1e-12));

    // Resume from the state: same coefficient, same next step.
    rlhf::AdaptiveKL resumed;
    resumed.load_state(kl.state());
    CHECK(resumed.value() == kl.value());
    CHECK(resumed.options().target == 6.0);
    kl.update(7.0, 64);
    resumed.update(7.0, 64);
    CHECK(resumed.value() == kl.value());
  }
  SUBCASE("AdaptiveKL errors name the field") {
    CHECK_THROWS_WITH_AS(rlhf::AdaptiveKL({.target = 0.0}),
                         "AdaptiveKL: Options.target must be a finite positive number, got 0", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::AdaptiveKL({.horizon = -1.0}),
                         "AdaptiveKL: Options.horizon must be a finite positive number, got -1", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::AdaptiveKL({.init = -0.1}),
                         "AdaptiveKL: Options.init must be a finite non-negative number, got -0.1", rlhf::Error);
    rlhf::AdaptiveKL kl;
    CHECK_THROWS_WITH_AS(kl.update(std::nan(""), 10), "AdaptiveKL::update: kl must be finite, got nan", rlhf::Error);
    CHECK_THROWS_WITH_AS(kl.update(1.0, -1), "AdaptiveKL::update: n_steps must be non-negative, got -1",
                         rlhf::Error);
    CHECK_THROWS_WITH_AS(kl.load_state(rlhf::FixedKL{}.state()),
                         "AdaptiveKL::load_state: expected an object with \"kind\": \"adaptive\", got "
                         "{\"coef\":0.2,\"kind\":\"fixed\"}",
                         rlhf::Error);
    auto state = kl.state();
    state["horizon"] = 0;
    CHECK_THROWS_WITH_AS(kl.load_state(state),
                         "AdaptiveKL::load_state: Options.horizon must be a finite positive number, got 0",
                         rlhf::Error);
    state.erase("horizon");
    CHECK_THROWS_WITH_AS(kl.load_state(state),
                         "AdaptiveKL::load_state: field 'horizon' is missing or not a number in "
                         "{\"init\":0.2,\"kind\":\"adaptive\",\"target\":6.0,\"value\":0.2}",
                         rlhf::Error);
  }
  SUBCASE("ConfiguredKL behaves as the controller the config chose") {
    static_assert(rlhf::KLController<rlhf::ConfiguredKL>);
    rlhf::ConfiguredKL adaptive({.controller = rlhf::KLControl::adaptive, .init = 0.2, .target = 6.0});
    rlhf::AdaptiveKL same{{.init = 0.2, .target = 6.0, .horizon = 10000}};
    for (double kl : {9.0, 6.6, 3.0, 0.0}) {
      adaptive.update(kl, 256);
      same.update(kl, 256);
      CHECK(adaptive.value() == same.value());
    }
    CHECK(adaptive.state() == same.state());
    rlhf::ConfiguredKL resumed({.controller = rlhf::KLControl::adaptive});
    resumed.load_state(adaptive.state());
    CHECK(resumed.value() == same.value());

    rlhf::ConfiguredKL fixed({.controller = rlhf::KLControl::fixed, .init = 0.05});
    fixed.update(100.0, 1000);
    CHECK(fixed.value() == 0.05);
    CHECK(fixed.state() == rlhf::FixedKL({.coef = 0.05}).state());
    const std::string refused =
        "FixedKL::load_state: expected an object with \"kind\": \"fixed\", got {\"horizon\":10000.0,\"init\":0.2,"
        "\"kind\":\"adaptive\",\"target\":6.0,\"value\":" + same.state()["value"].dump() + "}";
    CHECK_THROWS_WITH_AS(fixed.load_state(same.state()), refused.c_str(), rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::ConfiguredKL({.controller = rlhf::KLControl::fixed, .init = -1.0}),
                         "FixedKL: Options.coef must be a finite non-negative number, got -1", rlhf::Error);
  }
}

// ---- losses ----

TEST_CASE("ppo clipped_surrogate in the four regions") {
  const double c = 0.2;
  // One token per case: advantage A, ratio r = exp(logp - old). pg1 = -A r, pg2 = -A clamp(r, 0.8, 1.2),
  // loss = max(pg1, pg2); gradient d loss / d logp = -A r when pg1 is active, 0 when the clipped term is.
  struct Case {
    const char* name;
    double advantage, ratio, loss, grad;
    bool clipped;
  };
  const std::vector<Case> cases = {
      {"A > 0, inside", 1.0, 1.1, -1.1, -1.1, false},                     // pg1 = pg2 = -1.1
      {"A > 0, above 1 + c: clipped", 1.0, 1.5, -1.2, 0.0, true},         // pg1 = -1.5, pg2 = -1.2
      {"A > 0, below 1 - c: not clipped", 1.0, 0.5, -0.5, -0.5, false},   // pg1 = -0.5, pg2 = -0.8
      {"A < 0, inside", -1.0, 0.9, 0.9, 0.9, false},                      // pg1 = pg2 = 0.9
      {"A < 0, below 1 - c: clipped", -1.0, 0.5, 0.8, 0.0, true},         // pg1 = 0.5, pg2 = 0.8
      {"A < 0, above 1 + c: not clipped", -1.0, 1.5, 1.5, 1.5, false},    // pg1 = 1.5, pg2 = 1.2
      {"A = 2 > 0, above 1 + c: clipped", 2.0, 1.3, -2.4, 0.0, true},     // pg1 = -2.6, pg2 = -2.4
  };
  for (const auto& k : cases) {
    CAPTURE(k.name);
    auto old = f32({{-1.0}});
    auto logp = (old + std::log(k.ratio)).requires_grad_(true);
    auto out = rlhf::clipped_surrogate(logp, old, f32({{k.advantage}}), torch::ones({1, 1}), c);
    CHECK(out.loss.item<double>() == Approx(k.loss).epsilon(1e-6));
    CHECK(out.clip_fraction.item<double>() == (k.clipped ? 1.0 : 0.0));
    out.loss.backward();
    CHECK(logp.grad().item<double>() == Approx(k.grad).epsilon(1e-6));
  }

  SUBCASE("a batch with a mask") {
    // A = [1, 1, 1, -1, -1, -1], r = [1.1, 1.5, 0.5, 0.9, 0.5, 1.5]
    // max(pg1, pg2) = [-1.1, -1.2, -0.5, 0.9, 0.8, 1.5]; mean = 0.4 / 6 = 0.0666667; clipped: tokens 1 and 4 -> 2/6
    // approx_kl = 0.5 * mean(log^2 r) = 0.5 * (0.0090840 + 0.1644020 + 0.4804530 + 0.0111008 + 0.4804530 + 0.1644020) / 6
    //           = 0.1091579
    auto old = f32({{-1, -2, -3, -1, -2, -3}});
    auto ratio = f32({{1.1, 1.5, 0.5, 0.9, 0.5, 1.5}});
    auto logp = old + ratio.log();
    auto adv = f32({{1, 1, 1, -1, -1, -1}});
    auto out = rlhf::clipped_surrogate(logp, old, adv, torch::ones({1, 6}), c);
    CHECK(out.loss.item<double>() == Approx(0.4 / 6.0).epsilon(1e-5));
    CHECK(out.clip_fraction.item<double>() == Approx(2.0 / 6.0));
    CHECK(out.approx_kl.item<double>() == Approx(0.1091579004).epsilon(1e-5));
    // Mask [1, 1, 1, 1, 0, 0]: (-1.1 - 1.2 - 0.5 + 0.9) / 4 = -0.475; clipped 1/4
    auto masked = rlhf::clipped_surrogate(logp, old, adv, torch::tensor({{1, 1, 1, 1, 0, 0}}), c);
    CHECK(masked.loss.item<double>() == Approx(-0.475).epsilon(1e-5));
    CHECK(masked.clip_fraction.item<double>() == Approx(0.25));
  }
  SUBCASE("errors") {
    auto x = torch::zeros({2, 3});
    CHECK_THROWS_WITH_AS(rlhf::clipped_surrogate(x, x, x, x, -0.1),
                         "clipped_surrogate: clip_coef must be non-negative, got -0.1", rlhf::Error);
    CHECK_THROWS_WITH_AS(rlhf::clipped_surrogate(x, x, torch::zeros({2, 2}), x, 0.2),
                         "clipped_surrogate: advantages has shape [2, 2], logprobs has shape [2, 3]; they must match",
                         rlhf::Error);
  }
}

TEST_CASE("ppo value_loss with clipping active and inactive") {
  // c = 0.2; v_clip = clamp(v, old - 0.2, old + 0.2); l1 = (v - R)^2, l2 = (v_clip - R)^2
  //   token 0: v 0.9, old 0.8, R 1.5: v_clip 0.9 (inside)  l1 = l2 = 0.36          -> 0.36
  //   token 1: v 2.0, old 1.0, R 1.0: v_clip 1.2           l1 = 1, l2 = 0.04        -> 1     (clip not active)
  //   token 2: v 0.0, old 0.5, R 0.0: v_clip 0.3           l1 = 0, l2 = 0.09        -> 0.09  (clip active)
  //   token 3: v 3.0, old 1.0, R 3.0: v_clip 1.2           l1 = 0, l2 = 3.24        -> 3.24  (clip active)
  //   loss = 0.5 * (0.36 + 1 + 0.09 + 3.24) / 4 = 0.58625, clip_fraction = 2/4
  auto values = f32({{0.9, 2.0, 0.0, 3.0}}).requires_grad_(true);
  auto old = f32({{0.8, 1.0, 0.5, 1.0}});
  auto returns = f32({{1.5, 1.0, 0.0, 3.0}});
  auto ones = torch::ones({1, 4});
  auto clipped = rlhf::value_loss(values, old, returns, ones, 0.2);
  CHECK(clipped.loss.item<double>() == Approx(0.58625).epsilon(1e-6));
  CHECK(clipped.clip_fraction.item<double>() == Approx(0.5));
  // d loss / d v = 0.5 * 2 (v - R) / 4 where l1 is active, 0 where the clipped prediction is:
  //   [(0.9 - 1.5) / 4, (2 - 1) / 4, 0, 0] = [-0.15, 0.25, 0, 0]
  clipped.loss.backward();
  CHECK(max_abs_diff(values.grad(), f32({{-0.15, 0.25, 0.0, 0.0}})) < 1e-6);

  // Without clipping: 0.5 * (0.36 + 1 + 0 + 0) / 4 = 0.17
  auto plain = rlhf::value_loss(values, old, returns, ones, std::nullopt);
  CHECK(plain.loss.item<double>() == Approx(0.17).epsilon(1e-6));
  CHECK(plain.clip_fraction.item<double>() == 0.0);
  // A clip range wide enough never binds: the same as no clipping.
  CHECK(rlhf::value_loss(values, old, returns, ones, 10.0).loss.item<double>() == Approx(0.17).epsilon(1e-6));
  // Mask [1, 1, 0, 1]: 0.5 * (0.36 + 1 + 3.24) / 3 = 0.7666667, clipped 1/3
  auto masked = rlhf::value_loss(values, old, returns, torch::tensor({{1, 1, 0, 1}}), 0.2);
  CHECK(masked.loss.item<double>() == Approx(4.6 / 6.0).epsilon(1e-6));
  CHECK(masked.clip_fraction.item<double>() == Approx(1.0 / 3.0));
  CHECK_THROWS_WITH_AS(rlhf::value_loss(values, old, returns, ones, -0.2),
                       "value_loss: clip_range_value must be non-negative, got -0.2", rlhf::Error);
}

TEST_CASE("ppo entropy bonus and explained variance") {
  auto entropy = f32({{1, 2, 3}});
  auto mask = torch::tensor({{1, 1, 0}});
  CHECK(rlhf::mean_entropy(entropy, mask).item<double>() == Approx(1.5));          // (1 + 2) / 2
  CHECK(rlhf::entropy_bonus(entropy, mask, 0.01).item<double>() == Approx(0.015));  // 0.01 * 1.5

  // R = [1, 2, 3, 4], V = [1, 2, 3, 3]: R - V = [0, 0, 0, 1], var = 0.1875; var(R) = 1.25; 1 - 0.1875 / 1.25 = 0.85
  auto returns = f32({{1, 2, 3, 4}});
  auto values = f32({{1, 2, 3, 3}});
  CHECK(rlhf::explained_variance(values, returns, torch::ones({1, 4})).item<double>() == Approx(0.85));
  // Masking the one wrong prediction: a perfect fit.
  CHECK(rlhf::explained_variance(values, returns, torch::tensor({{1, 1, 1, 0}})).item<double>() == Approx(1.0));
  // Constant returns: undefined (NaN).
  CHECK(std::isnan(rlhf::explained_variance(values, torch::ones({1, 4}), torch::ones({1, 4})).item<double>()));
}
