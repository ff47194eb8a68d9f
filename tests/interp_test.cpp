#include "test_util.hpp"
#include "ppo_fixtures.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <rlhf/interp/ablation.hpp>
#include <rlhf/interp/attribution.hpp>
#include <rlhf/interp/capture.hpp>
#include <rlhf/interp/shift_recorder.hpp>
#include <rlhf/interp/shift_store.hpp>
#include <rlhf/model/gpt2.hpp>
#include <rlhf/ppo/trainer.hpp>
#include <rlhf/rewards/reward.hpp>
#include <rlhf/model/actor_critic.hpp>
#include <rlhf/reward_model/reward_trainer.hpp>
#include <rlhf/train/lm_trainer.hpp>

namespace {

/// The tiny GPT-2 shape of these tests, without dropout (training mode is deterministic).
rlhf::GPT2Config tiny_config(int64_t n_layer = 2) {
  rlhf::GPT2Config c;
  c.vocab_size = 29;
  c.n_positions = 16;
  c.n_embd = 16;
  c.n_layer = n_layer;
  c.n_head = 2;
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = 0;
  c.initializer_range = 0.2;  // large weights: gradients well above float noise
  return c;
}

/// A tiny GPT-2 initialised from `seed`.
rlhf::GPT2<> tiny_gpt2(uint64_t seed, int64_t n_layer = 2) {
  torch::manual_seed(seed);
  return rlhf::GPT2<>(tiny_config(n_layer));
}

/// Random token ids [b, t] in [0, vocab).
torch::Tensor random_ids(int64_t b, int64_t t, int64_t vocab, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(vocab, {b, t}, gen, torch::kLong);
}

/// The mean next-token cross-entropy over every position after the first, divided by `n` (default: the number of
/// targets of `ids`), so that a row's loss alone is its share of the batch loss. The output projection runs on
/// [B, T - 1, D].
template <class Model>
torch::Tensor lm_loss(Model& model, const torch::Tensor& ids, double n = 0) {
  const int64_t b = ids.size(0), t = ids.size(1);
  auto hidden = model->forward(ids, torch::ones_like(ids));                  // [B, T, D]
  auto logits = model->logits(hidden.narrow(1, 0, t - 1));                  // [B, T-1, V]
  auto targets = ids.narrow(1, 1, t - 1);                                   // [B, T-1]
  auto nll = torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}), targets.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  return nll / (n > 0 ? n : static_cast<double>(b * (t - 1)));
}

/// The summed cross-entropy of the targets `loss_mask` marks, divided by `n`, with the output projection on the
/// flattened rows [N, D] of the positions predicting them (as LMTrainer computes it).
template <class Model>
torch::Tensor lm_loss_rows(Model& model, const torch::Tensor& ids, const torch::Tensor& loss_mask, double n) {
  const int64_t t = ids.size(1);
  auto hidden = model->forward(ids, torch::ones_like(ids));                   // [B, T, D]
  auto is_target = loss_mask.narrow(1, 1, t - 1).ne(0);                      // [B, T-1]
  auto logits = model->logits(hidden.narrow(1, 0, t - 1).index({is_target}));  // [N, V]
  auto targets = ids.narrow(1, 1, t - 1).index({is_target});                 // [N]
  return torch::nn::functional::cross_entropy(
             logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)) /
         n;
}

/// A loss mask marking every token after the first as a target.
torch::Tensor targets_after_first(const torch::Tensor& ids) {
  auto mask = torch::ones_like(ids);
  mask.select(1, 0).zero_();
  return mask;
}

/// One optimiser step of `model` on `info.ids` with loss `loss()` through the StepCallback protocol, as a
/// hand-written loop calls a recorder; clips at `max_norm` (0 = no clipping) and returns the clip factor.
template <class Model, class Loss>
double recorded_step(Model& model, torch::optim::Optimizer& optimizer, rlhf::StepCallback& recorder,
                     rlhf::StepInfo info, Loss&& loss, double max_norm) {
  info.optimizer = &optimizer;
  if (!info.attention_mask.defined()) info.attention_mask = torch::ones_like(info.ids);
  recorder.on_step_begin(info);
  optimizer.zero_grad();
  loss().backward();
  std::vector<torch::Tensor> params;
  for (auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  const double norm = torch::nn::utils::clip_grad_norm_(params, max_norm > 0 ? max_norm : 1e30);
  info.grad_norm = norm;
  info.clip_coef = rlhf::clip_coefficient(max_norm, norm);
  recorder.on_gradients(info);
  optimizer.step();
  recorder.on_step_end(info);
  return info.clip_coef;
}

/// One step with lm_loss.
template <class Model>
double sgd_step(Model& model, torch::optim::Optimizer& sgd, rlhf::StepCallback& recorder, const torch::Tensor& ids,
                double max_norm, int64_t step) {
  return recorded_step(model, sgd, recorder, {.step = step, .ids = ids}, [&] { return lm_loss(model, ids); },
                       max_norm);
}

/// Each named parameter's gradient from one backward pass of `loss()` (zeros where none arrives).
template <class Model, class Loss>
std::map<std::string, torch::Tensor> gradients_of(Model& model, Loss&& loss) {
  model->zero_grad();
  loss().backward();
  std::map<std::string, torch::Tensor> out;
  for (auto& item : model->named_parameters())
    if (item.value().requires_grad())
      out[item.key()] = item.value().grad().defined() ? item.value().grad().clone()
                                                      : torch::zeros_like(item.value());
  return out;
}

using rlhf::test::rel_error;
using rlhf::test::sum_tolerance;

}  // namespace

TEST_SUITE("interp") {

TEST_CASE("interp: per-sample gradients summed over the batch equal the batch gradient") {
  SUBCASE("a Conv1D MLP in double precision") {
    torch::manual_seed(3);
    auto fc = std::make_shared<rlhf::Conv1DImpl>(5, 7, 0.5);
    auto proj = std::make_shared<rlhf::Conv1DImpl>(7, 3, 0.5);
    fc->to(torch::kDouble);
    proj->to(torch::kDouble);
    rlhf::LinearGradCapture cap_fc(fc, "fc"), cap_proj(proj, "proj");
    cap_fc.arm();
    cap_proj.arm();
    auto x = torch::randn({4, 6, 5}, torch::kDouble);
    auto y = proj->forward(torch::gelu(fc->forward(x)));  // [4, 6, 3]
    (y.pow(2).sum() / 7.0).backward();
    CHECK(cap_fc.complete_forwards() == 1);
    CHECK(rel_error(cap_fc.weight_grads().sum(0), fc->weight.grad()) < 1e-13);
    CHECK(rel_error(cap_fc.bias_grads().sum(0), fc->bias.grad()) < 1e-13);
    CHECK(rel_error(cap_proj.weight_grads().sum(0), proj->weight.grad()) < 1e-13);
    CHECK(rel_error(cap_proj.bias_grads().sum(0), proj->bias.grad()) < 1e-13);
    // A chunk of data is the same slice of the full per-datum tensor.
    CHECK(rel_error(cap_fc.weight_grads(1, 2), cap_fc.weight_grads().narrow(0, 1, 2)) < 1e-15);
  }
  SUBCASE("every linear layer of a GPT-2") {
    auto model = tiny_gpt2(5);
    auto units = rlhf::find_linear_units(*model);
    REQUIRE(units.size() == 8);
    std::vector<std::unique_ptr<rlhf::LinearGradCapture>> caps;
    for (auto& u : units) {
      caps.push_back(std::make_unique<rlhf::LinearGradCapture>(u.module, u.name));
      caps.back()->arm();
    }
    auto ids = random_ids(3, 9, 29, 1);
    lm_loss(model, ids).backward();
    for (size_t i = 0; i < units.size(); ++i) {
      CAPTURE(units[i].name);
      CHECK(rel_error(caps[i]->weight_grads().sum(0), units[i].module->weight.grad()) < 1e-5);
      CHECK(rel_error(caps[i]->bias_grads().sum(0), units[i].module->bias.grad()) < 1e-5);
    }
  }
  SUBCASE("nothing is kept without gradient mode, unarmed, or after detach") {
    auto model = tiny_gpt2(5);
    auto units = rlhf::find_linear_units(*model, rlhf::Targets::MLPIn);
    REQUIRE(units.size() == 2);
    CHECK(units[0].role == rlhf::LinearRole::mlp_in);
    CHECK(units[1].layer == 1);
    rlhf::LinearGradCapture cap(units[0].module, units[0].name);
    auto ids = random_ids(2, 5, 29, 2);
    model->forward(ids);
    CHECK(cap.batch_size() == 0);  // not armed
    cap.arm();
    {
      torch::NoGradGuard no_grad;
      model->forward(ids);
    }
    CHECK(cap.batch_size() == 0);  // no gradient mode
    cap.detach();
    CHECK(units[0].module->capture == nullptr);
  }
}

TEST_CASE("shift recorder: per-datum shifts equal separate single-datum backward passes") {
  const double lr = 0.3;
  SUBCASE("linear layers, layernorms and embeddings (the output projection on [B, T, D])") {
    auto model = tiny_gpt2(7);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr));
    rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::All, .biases = true, .layernorms = true,
                                          .embeddings = true, .top_k = 100, .datum_chunk = 2, .keep_dense = true});
    auto ids = random_ids(5, 8, 29, 3);
    const double n = 5.0 * 7.0;
    // Reference: one backward per datum, loss = the datum's terms of the batch loss.
    std::vector<std::map<std::string, torch::Tensor>> single;
    for (int64_t b = 0; b < 5; ++b)
      single.push_back(gradients_of(model, [&] { return lm_loss(model, ids.narrow(0, b, 1), n); }));

    sgd_step(model, sgd, recorder, ids, /*max_norm=*/0, 0);
    const auto& dense = recorder.last_dense();
    // 8 linear layers x (weight, bias), 5 layernorms x (gain, bias), wte and wpe.
    REQUIRE(dense.size() == 28);
    CHECK(recorder.tensor_names().front() == "transformer.wte.weight");
    for (const auto& d : dense) {
      CAPTURE(d.name);
      REQUIRE(d.data.size(0) == 5);
      for (int64_t b = 0; b < 5; ++b) CHECK(rel_error(d.data[b], single[b].at(d.name) * -lr) < 1e-4);
      CHECK(d.momentum.abs().max().item<double>() == 0);
      CHECK(rel_error(d.data.sum(0), d.applied) < 1e-4);
    }
  }
  SUBCASE("the output projection on flattened target rows [N, D], uneven targets per datum") {
    auto model = tiny_gpt2(8);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr));
    rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::MLPIn, .embeddings = true, .keep_dense = true});
    auto ids = random_ids(4, 7, 29, 4);
    // Row 0: every token a target; row 1: none; rows 2 and 3: a few.
    auto mask = torch::tensor({1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1},
                              torch::kLong)
                    .view({4, 7});
    const double n = static_cast<double>(mask.narrow(1, 1, 6).sum().item<int64_t>());
    std::vector<std::map<std::string, torch::Tensor>> single;
    for (int64_t b = 0; b < 4; ++b)
      single.push_back(gradients_of(model, [&] {
        return lm_loss_rows(model, ids.narrow(0, b, 1), mask.narrow(0, b, 1), n);
      }));
    recorded_step(model, sgd, recorder, {.step = 0, .ids = ids, .loss_mask = mask},
                  [&] { return lm_loss_rows(model, ids, mask, n); }, 0);
    const auto& dense = recorder.last_dense();
    REQUIRE(dense.size() == 4);  // wte, wpe, 2 x c_fc.weight
    for (const auto& d : dense) {
      CAPTURE(d.name);
      for (int64_t b = 0; b < 4; ++b) {
        CAPTURE(b);
        CHECK(rel_error(d.data[b], single[b].at(d.name) * -lr) < 1e-4);
      }
    }
    // Without the mask the rows cannot be mapped to data.
    CHECK_THROWS_WITH_AS(recorded_step(model, sgd, recorder, {.step = 1, .ids = ids},
                                       [&] { return lm_loss_rows(model, ids, mask, n); }, 0),
                         doctest::Contains("flattened rows [N, D]; mapping them to data needs StepInfo::loss_mask"),
                         rlhf::Error);
  }
  SUBCASE("LoRA adapters' factors") {
    torch::manual_seed(9);
    rlhf::GPT2<rlhf::LoRA<3, rlhf::Targets::All>> model(tiny_config());
    {
      torch::NoGradGuard no_grad;  // fresh adapters have B = 0, so A would get no gradient
      for (auto& item : model->named_parameters())
        if (item.key().ends_with("lora_B")) item.value().normal_(0, 0.3);
    }
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr));
    rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::All, .biases = true, .layernorms = true,
                                          .keep_dense = true});
    CHECK(recorder.units().size() == 8);
    CHECK(recorder.units().front().lora != nullptr);
    auto ids = random_ids(3, 6, 29, 5);
    std::vector<std::map<std::string, torch::Tensor>> single;
    for (int64_t b = 0; b < 3; ++b)
      single.push_back(gradients_of(model, [&] { return lm_loss(model, ids.narrow(0, b, 1), 3.0 * 5.0); }));
    sgd_step(model, sgd, recorder, ids, 0, 0);
    const auto& dense = recorder.last_dense();
    REQUIRE(dense.size() == 16);  // 8 layers x (lora_A, lora_B); base weights, biases and layernorms are frozen
    for (const auto& d : dense) {
      CAPTURE(d.name);
      CHECK((d.name.ends_with("lora_A") || d.name.ends_with("lora_B")));
      for (int64_t b = 0; b < 3; ++b) CHECK(rel_error(d.data[b], single[b].at(d.name) * -lr) < 1e-4);
      CHECK(rel_error(d.data.sum(0), d.applied) < 1e-4);
    }
  }
}

TEST_CASE("shift recorder: the shifts of a step sum to the applied update with clipping active") {
  SUBCASE("SGD with weight decay") {
    auto model = tiny_gpt2(11);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.5).weight_decay(0.1));
    rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::All, .biases = true, .keep_dense = true});
    for (int64_t step = 0; step < 3; ++step) {
      const double clip = sgd_step(model, sgd, recorder, random_ids(4, 10, 29, 20 + step), /*max_norm=*/0.05, step);
      CHECK(clip < 1);  // clipping is active
      CHECK(recorder.last().clip_coef == doctest::Approx(clip));
      for (const auto& d : recorder.last_dense()) {
        CAPTURE(d.name);
        CHECK(rel_error(d.data.sum(0) + d.decay, d.applied) < 1e-4);
        if (d.name.ends_with(".weight")) CHECK(d.decay.abs().max().item<double>() > 0);
      }
    }
  }
  SUBCASE("SGD with momentum and dampening, and with Nesterov momentum") {
    for (const bool nesterov : {false, true}) {
      CAPTURE(nesterov);
      auto model = tiny_gpt2(14);
      const double lr = 0.2, mu = 0.9, damp = nesterov ? 0.0 : 0.1, wd = 0.05;
      torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(lr).momentum(mu).dampening(damp)
                                                     .weight_decay(wd).nesterov(nesterov));
      rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::All, .biases = true, .layernorms = true,
                                            .embeddings = true, .keep_dense = true});
      std::map<std::string, torch::Tensor> buffer;  // the momentum buffers, kept here independently of torch's
      auto params = model->named_parameters();
      for (int64_t step = 0; step < 3; ++step) {
        std::map<std::string, torch::Tensor> before;
        for (auto& item : model->named_parameters()) before[item.key()] = item.value().detach().clone();
        const double clip = sgd_step(model, sgd, recorder, random_ids(4, 10, 29, 60 + step), 0.05, step);
        CHECK(clip < 1);
        REQUIRE(recorder.last_dense().size() == 28);
        for (const auto& d : recorder.last_dense()) {
          CAPTURE(d.name);
          CAPTURE(step);
          CHECK(rel_error(d.data.sum(0) + d.momentum + d.decay, d.applied) < sum_tolerance(d.name));
          auto grad = params[d.name].grad() + wd * before.at(d.name);  // SGD's d_p: the clipped gradient plus weight decay
          auto& buf = buffer[d.name];
          if (step == 0) {
            // No earlier step: the data and the decay carry the update (up to rounding).
            CHECK(rel_error(d.data.sum(0) + d.decay, d.applied) < 1e-3);
            buf = grad.clone();
          } else {
            CHECK(rel_error(d.momentum, buf * (-lr * mu * (nesterov ? mu : 1.0))) < 1e-3);
            buf = buf * mu + grad * (1 - damp);
          }
        }
      }
    }
  }
  SUBCASE("AdamW through LMTrainer (momentum and decoupled weight decay)") {
    auto model = tiny_gpt2(12);
    auto trainer = rlhf::LMTrainer<rlhf::GPT2<>>(
        model, {.total_steps = 10, .lr = 1e-2, .weight_decay = 0.1, .max_grad_norm = 0.05, .train_dropout = false});
    auto recorder = std::make_shared<rlhf::ShiftRecorder>(
        *model, rlhf::ShiftRecorderOptions{.units = rlhf::Targets::All, .biases = true, .layernorms = true,
                                           .embeddings = true, .keep_dense = true});
    trainer.add_callback(recorder);
    for (int64_t step = 0; step < 4; ++step) {
      auto ids = random_ids(3, 9, 29, 40 + step);
      auto stats = trainer.step(ids, torch::ones_like(ids), targets_after_first(ids));
      CHECK(stats.grad_norm > 0.05);  // clipped
      CHECK(recorder->last().clip_coef < 1);
      REQUIRE(recorder->last_dense().size() == 28);
      for (const auto& d : recorder->last_dense()) {
        CAPTURE(d.name);
        CAPTURE(step);
        CHECK(rel_error(d.data.sum(0) + d.momentum + d.decay, d.applied) < sum_tolerance(d.name));
        if (step > 0) CHECK(d.momentum.abs().max().item<double>() > 0);
        // At the first step there is no earlier moment: the data carry the update (up to rounding, which Adam's
        // preconditioner amplifies where the gradient nearly cancels; the key biases' exact gradient is zero).
        if (step == 0 && d.name.find("c_attn.bias") == std::string::npos)
          CHECK(rel_error(d.data.sum(0) + d.decay, d.applied) < 1e-2);
      }
    }
    trainer.remove_callback(recorder);
  }
  SUBCASE("LMTrainer's chunked loss (logits recomputed in the backward pass) gives the same shares") {
    std::vector<std::vector<rlhf::DenseShares>> runs;
    for (const int64_t chunk : {0, 5}) {
      auto model = tiny_gpt2(15);
      auto trainer = rlhf::LMTrainer<rlhf::GPT2<>>(
          model, {.total_steps = 10, .lr = 1e-2, .train_dropout = false, .loss_chunk_rows = chunk});
      auto recorder = std::make_shared<rlhf::ShiftRecorder>(
          *model, rlhf::ShiftRecorderOptions{.units = rlhf::Targets::MLPIn, .embeddings = true, .keep_dense = true});
      trainer.add_callback(recorder);
      auto ids = random_ids(3, 9, 29, 50);
      auto mask = targets_after_first(ids);
      mask[1].narrow(0, 0, 5).zero_();  // uneven targets per row
      trainer.step(ids, torch::ones_like(ids), mask);
      runs.push_back(recorder->last_dense());
    }
    REQUIRE(runs[0].size() == 4);
    REQUIRE(runs[1].size() == 4);
    for (size_t i = 0; i < 4; ++i) {
      CAPTURE(runs[0][i].name);
      // The shares pass through AdamW's 1 / sqrt(v), which amplifies the rounding of other GEMM shapes where a
      // weight's gradient nearly cancels: 1e-5 to 1e-3 depending on the BLAS kernel. A wrong row mapping is O(1).
      CHECK(rel_error(runs[1][i].data, runs[0][i].data) < 5e-3);
      CHECK(rel_error(runs[1][i].data.sum(0) + runs[1][i].momentum + runs[1][i].decay, runs[1][i].applied) <
            sum_tolerance(runs[1][i].name));
    }
  }
}

TEST_CASE("shift recorder: RewardTrainer's steps are recorded, one datum per text of a pair") {
  torch::manual_seed(21);
  rlhf::RewardModel<> model{rlhf::GPT2<>(tiny_config())};
  rlhf::RewardTrainer<> trainer(model, {.total_steps = 10, .lr = 1e-2, .head_lr = 1e-2, .max_grad_norm = 0.05});
  auto recorder = std::make_shared<rlhf::ShiftRecorder>(
      *model->base, rlhf::ShiftRecorderOptions{.units = rlhf::Targets::All, .layernorms = true, .embeddings = true,
                                               .keep_dense = true});
  trainer.add_callback(recorder);
  auto chosen = random_ids(3, 6, 29, 70), rejected = random_ids(3, 4, 29, 71);
  auto rejected_mask = torch::ones_like(rejected);
  rejected_mask[2][3] = 0;
  for (int64_t step = 0; step < 2; ++step) {
    auto stats = trainer.step(chosen, torch::ones_like(chosen), rejected, rejected_mask);
    CHECK(stats.grad_norm > 0.05);
    CHECK(recorder->last().step == step);
    CHECK(recorder->last().clip_coef < 1);
    // Data: the 3 chosen texts, then the 3 rejected ones (padding and masked tokens dropped).
    REQUIRE(recorder->last().data.size() == 6);
    CHECK(recorder->last().data[0].size() == 6);
    CHECK(recorder->last().data[3].size() == 4);
    CHECK(recorder->last().data[5].size() == 3);
    REQUIRE(recorder->last_dense().size() == 20);  // 8 linear weights, 5 layernorms x 2, wte, wpe
    for (const auto& d : recorder->last_dense()) {
      CAPTURE(d.name);
      CHECK(d.data.size(0) == 6);
      CHECK(rel_error(d.data.sum(0) + d.momentum + d.decay, d.applied) < sum_tolerance(d.name));
    }
  }
  trainer.remove_callback(recorder);
  trainer.step(chosen, torch::ones_like(chosen), rejected, rejected_mask);
  CHECK(recorder->stats().steps == 2);
}

TEST_CASE("shift recorder: the sampled-threshold top-k equals a full top-k") {
  auto sorted_indices = [](const torch::Tensor& t) { return std::get<0>(t.sort()); };
  auto gen = at::detail::createCPUGenerator(3);
  SUBCASE("random magnitudes, large and small k") {
    auto magnitude = torch::randn({3'000'000}, gen).abs_();
    for (const int64_t k : {1, 1000, 40'000}) {
      CAPTURE(k);
      auto got = rlhf::detail::top_k_indices(magnitude, k);
      REQUIRE(got.numel() == k);
      CHECK(torch::equal(sorted_indices(got), sorted_indices(std::get<1>(magnitude.topk(k)))));
    }
  }
  SUBCASE("a few large entries among zeros, and ties that defeat the threshold") {
    auto sparse = torch::zeros({2'000'000});
    auto where = torch::randperm(2'000'000, gen).narrow(0, 0, 500);
    sparse.index_fill_(0, where, 1.0);
    CHECK(torch::equal(sorted_indices(rlhf::detail::top_k_indices(sparse, 500)), sorted_indices(where)));
    auto ties = torch::ones({2'000'000});  // nothing exceeds the sampled threshold: the full top-k runs
    auto got = rlhf::detail::top_k_indices(ties, 300);
    CHECK(got.numel() == 300);
    CHECK(ties.index_select(0, got).eq(1).all().item<bool>());
  }
}

TEST_CASE("shift store: the stored top-k equals a brute-force top-k") {
  rlhf::test::TempDir dir;
  const auto path = dir / "shifts.db";
  auto model = tiny_gpt2(13);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  auto store = std::make_shared<rlhf::ShiftStore>(path);
  const int64_t k = 60;
  rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::MLP | rlhf::Targets::AttnOut, .top_k = k,
                                        .datum_chunk = 3, .keep_dense = true},
                               store);
  recorder.set_epoch(2);
  auto ids = random_ids(4, 7, 29, 5);
  sgd_step(model, sgd, recorder, ids, 1.0, 0);
  sgd_step(model, sgd, recorder, ids, 1.0, 1);  // the same data again: the data table keeps one copy

  // Brute force over the dense shares of the last step: (|diff|, row, unit, idx, diff).
  std::vector<std::tuple<double, int64_t, int64_t, int64_t, double>> all;
  for (const auto& d : recorder.last_dense()) {
    const int64_t unit = recorder.unit_id(d.name);
    REQUIRE(unit >= 0);
    auto flat = d.data.reshape({d.data.size(0), -1}).to(torch::kDouble).contiguous();
    for (int64_t b = 0; b < flat.size(0); ++b)
      for (int64_t i = 0; i < flat.size(1); ++i) {
        const double v = flat[b][i].item<double>();
        all.emplace_back(std::abs(v), b, unit, i, v);
      }
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
  all.resize(k);

  store->flush();
  rlhf::ShiftDatabase db(path);
  CHECK(db.steps() == 2);
  CHECK(db.shift_rows() == 2 * k);
  rlhf::detail::SqliteStatement q(db.db(), "SELECT b.row, s.unit, s.idx, s.diff FROM shifts s JOIN batches b "
                                           "ON b.epoch = s.epoch AND b.step = s.step AND b.datum = s.datum "
                                           "WHERE s.epoch = 2 AND s.step = 1 ORDER BY abs(s.diff) DESC");
  std::vector<std::tuple<int64_t, int64_t, int64_t, double>> stored;
  while (q.step()) stored.emplace_back(q.integer(0), q.integer(1), q.integer(2), q.real(3));
  REQUIRE(stored.size() == static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    CAPTURE(i);
    CHECK(std::get<0>(stored[i]) == std::get<1>(all[i]));
    CHECK(std::get<1>(stored[i]) == std::get<2>(all[i]));
    CHECK(std::get<2>(stored[i]) == std::get<3>(all[i]));
    CHECK(std::get<3>(stored[i]) == doctest::Approx(std::get<4>(all[i])).epsilon(1e-6));
  }
  rlhf::detail::SqliteStatement data(db.db(), "SELECT count(*) FROM data");
  data.step();
  CHECK(data.integer(0) == 4);
  CHECK(db.tokens(0) == std::vector<int64_t>(ids[0].data_ptr<int64_t>(), ids[0].data_ptr<int64_t>() + 7));
  const auto stats = store->stats();
  CHECK(stats.steps == 2);
  CHECK(stats.rows == 2 * k);
  CHECK(stats.bytes > 0);
}

TEST_CASE("neuron: an MLP neuron owns a column of c_fc and a row of c_proj") {
  using rlhf::LinearRole;
  // c_fc weight [D = 4, d_mlp = 16]: element (i, n) = i * 16 + n belongs to neuron n.
  CHECK(rlhf::neuron_of(LinearRole::mlp_in, "weight", 16, 3 * 16 + 5) == 5);
  CHECK(rlhf::neuron_of(LinearRole::mlp_in, "bias", 16, 9) == 9);
  // c_proj weight [d_mlp = 16, D = 4]: element (n, o) = n * 4 + o belongs to neuron n.
  CHECK(rlhf::neuron_of(LinearRole::mlp_out, "weight", 4, 5 * 4 + 3) == 5);
  CHECK(!rlhf::neuron_of(LinearRole::mlp_out, "bias", 4, 3));
  CHECK(!rlhf::neuron_of(LinearRole::attn_out, "weight", 4, 3));
  // LoRA rank 2: c_fc's lora_B [16, 2] row n and c_proj's lora_A [2, 16] column n; the other factors act on the
  // residual stream.
  CHECK(rlhf::neuron_of(LinearRole::mlp_in, "lora_B", 2, 5 * 2 + 1) == 5);
  CHECK(rlhf::neuron_of(LinearRole::mlp_out, "lora_A", 16, 1 * 16 + 5) == 5);
  CHECK(!rlhf::neuron_of(LinearRole::mlp_in, "lora_A", 4, 3));
  CHECK(!rlhf::neuron_of(LinearRole::mlp_out, "lora_B", 2, 3));
  // c_attn [D = 8, 3D = 24] with 2 heads of 4: column 4 + 16 (v of head 1) and c_proj row 6 (head 1).
  CHECK(rlhf::head_of(LinearRole::attn_qkv, "weight", 24, 2 * 24 + 20, 2) == 1);
  CHECK(rlhf::head_of(LinearRole::attn_out, "weight", 8, 6 * 8 + 1, 2) == 1);

  SUBCASE("the store's neuron view agrees, and aggregation per neuron") {
    rlhf::test::TempDir dir;
    auto model = tiny_gpt2(17);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
    {
      auto store = std::make_shared<rlhf::ShiftStore>(dir / "s.db");
      rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::MLP, .biases = true, .top_k = 200}, store);
      for (int64_t step = 0; step < 3; ++step) sgd_step(model, sgd, recorder, random_ids(4, 8, 29, step), 1.0, step);
      store->create_indexes();
    }
    rlhf::ShiftDatabase db(dir / "s.db");
    rlhf::detail::SqliteStatement q(db.db(), "SELECT u.role, u.kind, u.cols, s.idx, n.neuron FROM shifts s "
                                             "JOIN units u ON u.unit = s.unit LEFT JOIN neuron_shifts n ON "
                                             "n.epoch = s.epoch AND n.step = s.step AND n.datum = s.datum AND "
                                             "n.unit = s.unit AND n.idx = s.idx");
    int64_t rows = 0, with_neuron = 0;
    while (q.step()) {
      ++rows;
      const auto role = q.text(0) == "mlp_in" ? LinearRole::mlp_in : LinearRole::mlp_out;
      const auto expected = rlhf::neuron_of(role, q.text(1), q.integer(2), q.integer(3));
      CHECK(expected.has_value() == !q.is_null(4));
      if (expected) {
        CHECK(*expected == q.integer(4));
        ++with_neuron;
      }
    }
    CHECK(rows == 600);
    auto summary = db.neuron_summary();
    REQUIRE(!summary.empty());
    int64_t total = 0;
    for (const auto& s : summary) total += s.entries;
    CHECK(total == with_neuron);
    CHECK(summary.front().entries >= summary.back().entries);
    auto attributed = db.attributed_data(summary.front().id);
    CHECK(!attributed.empty());
    CHECK(!db.token_counts(attributed).empty());
  }
}

TEST_CASE("neuron: attribution end to end on a short SGD run") {
  rlhf::test::TempDir dir;
  auto model = tiny_gpt2(23);
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.5));
  // Data: random rows, a quarter of them with the pattern 5 6 5 6 (a token pair the model can learn).
  auto data = random_ids(32, 8, 29, 99);
  for (int64_t r = 0; r < 32; r += 4) data[r].narrow(0, 2, 4).copy_(torch::tensor({5, 6, 5, 6}));
  {
    auto store = std::make_shared<rlhf::ShiftStore>(dir / "run.db", rlhf::ShiftStoreOptions{.queue_steps = 2});
    rlhf::ShiftRecorder recorder(*model, {.units = rlhf::Targets::MLP, .top_k = 40}, store);
    for (int64_t epoch = 0; epoch < 3; ++epoch) {
      recorder.set_epoch(epoch);
      for (int64_t b = 0; b < 4; ++b) sgd_step(model, sgd, recorder, data.narrow(0, b * 8, 8), 0.5, epoch * 4 + b);
    }
    store->create_indexes();
    CHECK(store->stats().steps == 12);
  }
  rlhf::ShiftDatabase db(dir / "run.db");
  CHECK(db.steps() == 12);
  auto corpus = db.corpus_token_counts();
  int64_t corpus_tokens = 0;
  for (const auto& [token, n] : corpus) corpus_tokens += n;
  CHECK(corpus_tokens == 3 * 32 * 8);  // every datum, once per epoch
  auto top = db.neuron_summary(2).front();
  auto attributed = db.attributed_data(top.id);
  REQUIRE(!attributed.empty());
  int64_t occurrences = 0;
  for (const auto& [datum, times] : attributed) {
    CHECK(times >= 1);
    CHECK(times <= 3);  // a datum appears once per epoch
    occurrences += times;
  }
  CHECK(occurrences >= static_cast<int64_t>(attributed.size()));
  auto notable = db.notable_tokens(top.id, {.min_count = 2, .top_relative = 10, .top_count = 5});
  CHECK(notable.size() <= 5);
  std::set<int64_t> notable_ids;
  for (const auto& t : notable) notable_ids.insert(t.token);
  std::vector<torch::Tensor> rows;
  for (const auto& [datum, times] : attributed) rows.push_back(torch::tensor(db.tokens(datum)));
  auto ids = torch::stack(rows);  // every datum has 8 tokens
  model->eval();
  auto table = rlhf::prediction_flips(*model, ids, torch::ones_like(ids), top.id, notable_ids);
  CHECK(table.positions == ids.numel());
  for (const auto& row : table.rows) CHECK(row.notable == notable_ids.contains(row.token));
  auto contexts = rlhf::compare_with_random_contexts(*model, ids, torch::ones_like(ids), data, torch::ones_like(data),
                                                     top.id, 3, 100);
  CHECK(contexts.ci_low <= contexts.ci_high);
}

TEST_CASE("interp: the token heuristic selects frequent, over-represented tokens") {
  // Corpus: 10 tokens. Token 0 is very common (dominant by count), 7 and 8 rare but over-represented with few
  // counts (dominant by relative frequency, below min_count), 3, 4, 5 over-represented with enough counts.
  std::map<int64_t, int64_t> corpus = {{0, 5000}, {1, 2000}, {2, 1000}, {3, 100}, {4, 80},
                                       {5, 120},  {6, 900},  {7, 2},    {8, 1},   {9, 797}};
  std::map<int64_t, int64_t> attributed = {{0, 500}, {1, 150}, {2, 90}, {3, 60}, {4, 40},
                                           {5, 30},  {6, 80},  {7, 2},  {8, 1},  {9, 47}};
  // attributed total 1000, corpus total 10000: relative = 10 * count / corpus count:
  // 0: 1.0, 1: 0.75, 2: 0.9, 3: 6.0, 4: 5.0, 5: 2.5, 6: 0.889, 7: 10, 8: 10, 9: 0.59
  auto picked = rlhf::select_tokens(attributed, corpus, {.min_count = 20, .top_relative = 4, .top_count = 2});
  // count >= 20 drops 7 and 8; top 4 by relative: 3 (6.0), 4 (5.0), 5 (2.5), 0 (1.0); top 2 of those by count:
  // 0 (500) and 3 (60).
  REQUIRE(picked.size() == 2);
  CHECK(picked[0].token == 0);
  CHECK(picked[1].token == 3);
  CHECK(picked[1].relative == doctest::Approx(6.0));
  CHECK(picked[1].freq == doctest::Approx(0.06));
  auto three = rlhf::select_tokens(attributed, corpus, {.min_count = 20, .top_relative = 3, .top_count = 2});
  REQUIRE(three.size() == 2);
  CHECK(three[0].token == 3);
  CHECK(three[1].token == 4);
  auto low = rlhf::select_tokens(attributed, corpus, {.min_count = 1, .top_relative = 2, .top_count = 5});
  REQUIRE(low.size() == 2);  // 7 and 8, both relative 10, by count
  CHECK(low[0].token == 7);
  CHECK(low[1].token == 8);
}

TEST_CASE("ablation: ablating a neuron through the API equals zeroing its weights by hand") {
  auto model = tiny_gpt2(19);
  model->eval();
  auto ids = random_ids(3, 10, 29, 8);
  auto mask = torch::ones_like(ids);
  torch::NoGradGuard no_grad;
  auto base = model->logits(model->forward(ids, mask));
  const rlhf::NeuronId neuron{1, 37};
  torch::Tensor ablated;
  {
    rlhf::NeuronAblation ablation(*model, neuron);
    ablated = model->logits(model->forward(ids, mask));
  }
  CHECK(rel_error(model->logits(model->forward(ids, mask)), base) == 0);  // restored exactly

  auto by_hand = tiny_gpt2(19);
  by_hand->eval();
  auto& mlp = by_hand->transformer->blocks[1]->mlp;
  mlp->c_fc->weight.select(1, 37).zero_();
  mlp->c_fc->bias[37].zero_();
  mlp->c_proj->weight.select(0, 37).zero_();
  auto expected = by_hand->logits(by_hand->forward(ids, mask));
  CHECK(rel_error(ablated, expected) < 1e-6);
  CHECK(rel_error(ablated, base) > 1e-6);  // the neuron mattered

  SUBCASE("flip tables and ratios") {
    auto table = rlhf::prediction_flips(*model, ids, mask, std::vector<rlhf::NeuronId>{{1, 37}, {1, 3}, {0, 5}},
                                        {2});
    CHECK(table.positions == 30);
    CHECK(table.row_flips.sum().item<int64_t>() == table.flips);
    int64_t involved = 0;
    for (const auto& row : table.rows) {
      CHECK(row.flips <= row.instances);
      CHECK(row.notable == (row.token == 2));
      involved += row.flips;
    }
    CHECK(involved == 2 * table.flips);  // each flip involves the token before and the token after
    auto same = rlhf::flip_ratio(torch::tensor({2, 0, 1}), torch::tensor({10, 10, 10}), torch::tensor({1, 1}),
                                 torch::tensor({10, 10}), 200);
    CHECK(same.rate == doctest::Approx(0.1));
    CHECK(same.baseline_rate == doctest::Approx(0.1));
    CHECK(same.ratio == doctest::Approx(1.0));
    CHECK(same.ci_low <= 1.0);
    CHECK(same.ci_high >= 1.0);
    auto random = rlhf::compare_with_random_neurons(*model, ids, mask, neuron, 3, 1, 50);
    CHECK(random.rate >= 0);
    auto stats = rlhf::activation_stats(*model, ids, mask, 1);
    CHECK(stats.positions == 30);
    CHECK(stats.mean.size(0) == 64);
    CHECK(model->transformer->blocks[1]->mlp->c_proj->capture == nullptr);
  }
}

TEST_CASE("interp: bigram shifts of the tied embedding") {
  torch::manual_seed(1);
  auto e0 = torch::randn({6, 3});
  auto e1 = e0.clone();
  e1[2][1] += 0.5;  // token 2's embedding moves: row 2 and column 2 of E E^T change
  auto shifts = rlhf::bigram_shifts(e0, e1, 5, {}, {}, /*chunk=*/4);
  REQUIRE(shifts.size() == 5);
  auto full = torch::mm(e1, e1.t()) - torch::mm(e0, e0.t());
  CHECK(std::abs(shifts[0].diff) == doctest::Approx(full.abs().max().item<double>()));
  for (const auto& s : shifts) {
    CHECK((s.prev == 2 || s.next == 2));
    CHECK(s.diff == doctest::Approx(full[s.prev][s.next].item<double>()));
  }
}

TEST_CASE("shift recorder: PPOTrainer's minibatch updates are recorded, and their shifts sum to each update") {
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  torch::manual_seed(31);
  rlhf::GPT2<> base(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 32, .n_embd = 16,
                                     .n_layer = 2, .n_head = 2, .bos_token_id = tokenizer.eos_id(),
                                     .eos_token_id = tokenizer.eos_id()});
  rlhf::ActorCritic<> policy(base);
  rlhf::test::RecordedPPO run(policy);
  auto& trainer = run.trainer;
  const auto& recorder = run.recorder;

  /// Checks the recorder's accounting right after each update (it is added after the recorder, so it runs after).
  struct Check : rlhf::StepCallback {
    std::shared_ptr<rlhf::ShiftRecorder> recorder;
    std::vector<int64_t> steps;
    int64_t clipped = 0;
    void on_gradients(const rlhf::StepInfo& info) override {
      CHECK(info.ids.size(0) == 4);  // the minibatch's rows: 8 samples / 2 minibatches
      CHECK(info.ids.size(1) == 2 + 6);  // BOS, "a", 6 generated tokens
      CHECK(info.loss_mask.narrow(1, 0, 2).sum().item<double>() == 0);  // the prompt is no target
      CHECK(info.loss_mask.narrow(1, 2, 6).sum().item<double>() == 4 * 6);
      clipped += info.clip_coef < 1;
    }
    void on_step_end(const rlhf::StepInfo& info) override {
      steps.push_back(info.step);
      CHECK(recorder->last().step == info.step);
      REQUIRE(recorder->last_dense().size() == 28);
      for (const auto& d : recorder->last_dense()) {
        CAPTURE(d.name);
        CAPTURE(info.step);
        CHECK(d.data.size(0) == 4);
        CHECK(rel_error(d.data.sum(0) + d.momentum + d.decay, d.applied) < sum_tolerance(d.name));
      }
    }
  };
  auto check = std::make_shared<Check>();
  check->recorder = recorder;
  trainer.add_callback(check);
  trainer.step();
  trainer.step();
  CHECK(check->steps == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(check->clipped == 8);  // clipping active at every update
  CHECK(recorder->stats().steps == 8);
  trainer.remove_callback(check);
  trainer.remove_callback(recorder);
  trainer.step();
  CHECK(recorder->stats().steps == 8);  // removed: nothing more recorded
}

TEST_CASE("GPT2 sinusoidal positions and uniform initialisation (the transparency experiments' model)") {
  rlhf::GPT2Config c{.vocab_size = 50, .n_positions = 12, .n_embd = 8, .n_layer = 2, .n_head = 2,
                     .activation_function = "relu", .sinusoidal_positions = true};
  torch::manual_seed(2);
  rlhf::GPT2<> model(c);
  const auto& wpe = model->transformer->wpe->weight;
  CHECK(!wpe.requires_grad());  // fixed, not trained
  // By hand: position 3, pair i = 1 of D = 8: rate 10000^(-2/8) = 0.1.
  CHECK(wpe[3][2].item<double>() == doctest::Approx(std::sin(0.3)));
  CHECK(wpe[3][3].item<double>() == doctest::Approx(std::cos(0.3)));
  CHECK(wpe[5][0].item<double>() == doctest::Approx(std::sin(5.0)));
  CHECK(wpe[0][1].item<double>() == doctest::Approx(1.0));

  rlhf::init_uniform(*model, 0.1);
  const auto& w = model->transformer->blocks[1]->mlp->c_fc->weight;
  CHECK(w.abs().max().item<double>() <= 0.1);
  CHECK(w.abs().max().item<double>() > 0.09);
  CHECK(model->transformer->blocks[1]->mlp->c_fc->bias.abs().max().item<double>() == 0);
  CHECK(model->transformer->wte->weight.abs().max().item<double>() <= 0.1);
  CHECK(rel_error(wpe, rlhf::sinusoidal_position_table(12, 8)) == 0);  // the table is kept
  CHECK_THROWS_WITH_AS(rlhf::init_uniform(*model, 0.0), "init_uniform: bound must be positive, got 0", rlhf::Error);
  {
    // A LoRA model's base weights too (N(0, 0.02) before: a bound of 0.5 is far above their spread); the adapters
    // keep their own initialisation (B = 0).
    rlhf::GPT2<rlhf::LoRA<2, rlhf::Targets::All>> lora(c);
    rlhf::init_uniform(*lora, 0.5);
    const auto& fc = lora->transformer->blocks[0]->mlp->c_fc;
    CHECK(fc->weight.abs().max().item<double>() <= 0.5);
    CHECK(fc->weight.abs().max().item<double>() > 0.4);
    CHECK(fc->bias.abs().max().item<double>() == 0);
    CHECK(fc->lora_B.abs().max().item<double>() == 0);
  }

  SUBCASE("config.json carries the key only when on, and validation") {
    CHECK(c.to_json().at("sinusoidal_positions") == true);
    CHECK(rlhf::GPT2Config::from_json(c.to_json()) == c);
    CHECK(!rlhf::GPT2Config{}.to_json().contains("sinusoidal_positions"));
    auto odd = c;
    odd.n_embd = 9;
    odd.n_head = 3;
    CHECK_THROWS_WITH_AS(odd.validate("c.json"),
                         "config: c.json: 'sinusoidal_positions' needs an even 'n_embd' (sin and cos pairs), got 9",
                         rlhf::Error);
  }
  SUBCASE("a saved folder loads back with the same outputs") {
    rlhf::test::TempDir dir;
    model.save_pretrained(dir / "m");
    auto loaded = rlhf::GPT2<>::from_pretrained(dir / "m");
    CHECK(loaded->config().sinusoidal_positions);
    model->eval();
    loaded->eval();
    auto ids = random_ids(2, 12, 50, 4);
    torch::NoGradGuard no_grad;
    CHECK(rel_error(loaded->forward(ids), model->forward(ids)) == 0);
  }
  SUBCASE("LMTrainer leaves the table alone") {
    rlhf::LMTrainer<rlhf::GPT2<>> trainer(model, {.total_steps = 5, .lr = 1e-2});
    auto ids = random_ids(2, 12, 50, 6);
    trainer.step(ids, torch::ones_like(ids), targets_after_first(ids));
    CHECK(rel_error(wpe, rlhf::sinusoidal_position_table(12, 8)) == 0);
  }
}

TEST_CASE("GPT2 embedding_scale multiplies the token embeddings, not the tied output projection") {
  rlhf::GPT2Config c{.vocab_size = 50,
                     .n_positions = 12,
                     .n_embd = 8,
                     .n_layer = 2,
                     .n_head = 2,
                     .activation_function = "relu",
                     .embd_pdrop = 0,
                     .attn_pdrop = 0,
                     .resid_pdrop = 0,
                     .sinusoidal_positions = true,
                     .embedding_scale = 2.5};
  torch::manual_seed(3);
  rlhf::GPT2<> model(c);
  rlhf::init_uniform(*model, 0.1);
  model->eval();
  auto ids = random_ids(2, 12, 50, 5);
  torch::NoGradGuard no_grad;
  auto hidden = model->forward(ids);  // [2, 12, 8]
  auto logits = model->logits(hidden);

  // By hand: the same model without the scale and with wte x 2.5 has the same residual stream, and the logits are
  // the final layernorm's output times the unscaled wte^T.
  auto plain_config = c;
  plain_config.embedding_scale = 1.0;
  rlhf::GPT2<> plain(plain_config);
  plain->eval();
  for (auto& item : plain->named_parameters()) item.value().copy_(model->named_parameters()[item.key()]);
  plain->transformer->wte->weight.mul_(2.5);
  CHECK(rel_error(hidden, plain->forward(ids)) < 1e-6);
  const auto& wte = model->transformer->wte->weight;  // [V, D], unscaled
  CHECK(rel_error(logits, torch::matmul(hidden, wte.t())) < 1e-6);
  plain->transformer->wte->weight.div_(2.5);
  CHECK(rel_error(hidden, plain->forward(ids)) > 1e-2);  // the scale matters

  SUBCASE("KV-cache decoding applies it") {
    auto cache = model->new_cache(2, 12);
    std::vector<torch::Tensor> parts = {model->forward(ids.narrow(1, 0, 5), {}, &cache)};
    for (int64_t i = 5; i < 12; ++i) parts.push_back(model->forward(ids.narrow(1, i, 1), {}, &cache));
    CHECK(rel_error(torch::cat(parts, 1), hidden) < 1e-5);
  }
  SUBCASE("config.json carries the key only when it is not 1, and validation") {
    CHECK(c.to_json().at("embedding_scale") == 2.5);
    CHECK(rlhf::GPT2Config::from_json(c.to_json()) == c);
    CHECK(!rlhf::GPT2Config{}.to_json().contains("embedding_scale"));
    CHECK(!plain_config.to_json().contains("embedding_scale"));
    CHECK(rlhf::GPT2Config::from_json(plain_config.to_json()).embedding_scale == 1.0);
    for (double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
      auto b = c;
      b.embedding_scale = bad;
      CAPTURE(bad);
      CHECK_THROWS_WITH_AS(
          b.validate("c.json"),
          fmt::format("config: c.json: 'embedding_scale' must be a positive finite number, got {}", bad).c_str(),
          rlhf::Error);
    }
    auto j = c.to_json();
    j["embedding_scale"] = 0;
    CHECK_THROWS_WITH_AS(rlhf::GPT2Config::from_json(j),
                         "config: config.json: 'embedding_scale' must be a positive finite number, got 0", rlhf::Error);
    j["embedding_scale"] = "2.5";
    CHECK_THROWS_WITH_AS(rlhf::GPT2Config::from_json(j),
                         "config: config.json: 'embedding_scale' must be a number, got \"2.5\"", rlhf::Error);
  }
  SUBCASE("a saved folder loads back with the same outputs") {
    rlhf::test::TempDir dir;
    model.save_pretrained(dir / "m");
    auto loaded = rlhf::GPT2<>::from_pretrained(dir / "m");
    CHECK(loaded->config().embedding_scale == 2.5);
    CHECK(loaded->config() == c);
    loaded->eval();
    CHECK(rel_error(loaded->forward(ids), hidden) == 0);
    CHECK(rel_error(loaded->logits(loaded->forward(ids)), logits) == 0);
  }
}

}  // TEST_SUITE
