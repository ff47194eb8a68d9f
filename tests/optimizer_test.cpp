#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>

#include <rlhf/train/optimizer.hpp>

namespace {

using torch::indexing::None;
using torch::indexing::Slice;

constexpr double kWeightDecay = 0.1;
constexpr double kEps = 1e-8;
const std::pair<double, double> kBetas{0.9, 0.95};

/// Parameter groups: one list of tensors per group.
using Groups = std::vector<std::vector<torch::Tensor>>;

/// A trainable leaf with the values and the strides of `values` (a strided view stays one).
torch::Tensor leaf(const torch::Tensor& values) {
  auto out = torch::empty_strided(values.sizes(), values.strides(), values.options().requires_grad(false));
  out.copy_(values.detach());
  return out.requires_grad_(true);
}

/// Parameters of every layout the step meets, two groups of them: odd sizes (tails shorter than a vector), a
/// 0-dim scalar, a tensor spanning several chunks of the fused step, a transposed (dense, non-contiguous) matrix, a
/// strided view that is not dense (its moments are contiguous: torch's path), and the ones whose gradient is zero
/// or undefined (see set_gradients).
Groups make_parameters() {
  torch::manual_seed(7);
  std::vector<torch::Tensor> first = {leaf(torch::randn({37, 53})), leaf(torch::randn({5})),
                                      leaf(torch::randn({})), leaf(torch::randn({300, 257}))};
  std::vector<torch::Tensor> second = {leaf(torch::randn({48, 64}).t()),
                                       leaf(torch::randn({9, 14}).index({Slice(), Slice(None, None, 2)})),
                                       leaf(torch::randn({1031})), leaf(torch::randn({3, 7}))};
  return {first, second};
}

/// Independent copies of `groups` (same values, same strides).
Groups copy_parameters(const Groups& groups) {
  Groups out;
  for (const auto& group : groups) {
    out.emplace_back();
    for (const auto& p : group) out.back().push_back(leaf(p));
  }
  return out;
}

/// The same gradients of step `step` for each copy in `copies`: random with the parameter's layout, except that
/// the last parameter of the first group gets a zero gradient and the last of the second group none (it must be
/// left alone).
void set_gradients(std::initializer_list<Groups*> copies, int64_t step) {
  torch::manual_seed(100 + step);
  const Groups& shape = **copies.begin();
  for (size_t g = 0; g < shape.size(); ++g)
    for (size_t i = 0; i < shape[g].size(); ++i) {
      const bool last = i + 1 == shape[g].size();
      if (g == 1 && last) continue;
      auto grad = (g == 0 && last) ? torch::zeros_like(shape[g][i]) : torch::randn_like(shape[g][i]);
      for (auto* copy : copies) (*copy)[g][i].mutable_grad() = grad.clone();
    }
}

/// torch::optim::AdamW over `groups` with the same options as GroupedAdamW builds.
torch::optim::AdamW torch_adamw(const Groups& groups,
                                const std::vector<double>& lrs) {
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  for (size_t i = 0; i < groups.size(); ++i) {
    auto options = std::make_unique<torch::optim::AdamWOptions>(lrs[i]);
    options->weight_decay(kWeightDecay).betas({kBetas.first, kBetas.second}).eps(kEps);
    param_groups.emplace_back(groups[i], std::move(options));
  }
  return torch::optim::AdamW(std::move(param_groups));
}

rlhf::GroupedAdamW grouped_adamw(const Groups& groups,
                                 const std::vector<double>& lrs) {
  rlhf::GroupedAdamW optimizer(kWeightDecay, kBetas, kEps);
  for (size_t i = 0; i < groups.size(); ++i) optimizer.add(fmt::format("g{}", i), groups[i], lrs[i]);
  optimizer.build("optimizer test");
  return optimizer;
}

/// Sets the learning rate of every group of a torch optimiser to its peak rate x `scale`, as set_scale() does.
void set_scale(torch::optim::AdamW& optimizer, const std::vector<double>& lrs, double scale) {
  auto& groups = optimizer.param_groups();
  for (size_t i = 0; i < groups.size(); ++i)
    static_cast<torch::optim::AdamWOptions&>(groups[i].options()).lr(lrs[i] * scale);
}

/// max |a - b| over max(1, max |b|).
double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = std::max(1.0, b.abs().max().item<double>());
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>() / scale;
}

const torch::optim::AdamWParamState* state_of(torch::optim::AdamW& optimizer, const torch::Tensor& param) {
  auto it = optimizer.state().find(rlhf::detail::optimizer_state_key(param));
  return it == optimizer.state().end() ? nullptr
                                       : static_cast<const torch::optim::AdamWParamState*>(it->second.get());
}

/// Checks parameters and state of `fused` against `reference` parameter by parameter.
void check_same(const Groups& fused_params, torch::optim::AdamW& fused,
                const Groups& reference_params, torch::optim::AdamW& reference,
                double tolerance) {
  for (size_t g = 0; g < fused_params.size(); ++g)
    for (size_t i = 0; i < fused_params[g].size(); ++i) {
      CAPTURE(g);
      CAPTURE(i);
      const auto& p = fused_params[g][i];
      const auto& r = reference_params[g][i];
      CHECK(p.strides() == r.strides());
      CHECK(relative_difference(p, r) <= tolerance);
      const auto* ps = state_of(fused, p);
      const auto* rs = state_of(reference, r);
      REQUIRE((ps == nullptr) == (rs == nullptr));
      if (!ps) continue;
      CHECK(ps->step() == rs->step());
      CHECK(relative_difference(ps->exp_avg(), rs->exp_avg()) <= tolerance);
      CHECK(relative_difference(ps->exp_avg_sq(), rs->exp_avg_sq()) <= tolerance);
    }
}

}  // namespace

TEST_CASE("GroupedAdamW: the fused step equals torch::optim::AdamW's step") {
  auto params = make_parameters();
  auto reference_params = copy_parameters(params);
  const std::vector<double> lrs = {3e-3, 1e-2};
  auto fused = grouped_adamw(params, lrs);
  auto reference = torch_adamw(reference_params, lrs);

  // The contiguous fp32 parameters take the fused kernel (their moments are created on the first step).
  set_gradients({&params, &reference_params}, 0);
  const auto untouched = params[1].back().detach().clone();
  const auto zero_grad_before = params[0].back().detach().clone();
  const double scales[] = {1.0, 0.5, 0.25, 1.0, 0.1, 0.7};
  for (int64_t step = 0; step < 6; ++step) {
    if (step > 0) set_gradients({&params, &reference_params}, step);
    fused.set_scale(scales[step]);
    set_scale(reference, lrs, scales[step]);
    fused.step();
    reference.step();
  }
  const auto& big = params[0][3];
  const auto* big_state = state_of(fused.optimizer(), big);
  REQUIRE(big_state != nullptr);
  CHECK(big.numel() > rlhf::detail::kFusedAdamWChunk);  // split over threads
  CHECK(rlhf::detail::fused_adamw_applies(big, big.grad(), big_state->exp_avg(), big_state->exp_avg_sq()));
  const auto& transposed = params[1][0];
  const auto* transposed_state = state_of(fused.optimizer(), transposed);
  REQUIRE(transposed_state != nullptr);
  CHECK(!transposed.is_contiguous());
  CHECK(rlhf::detail::fused_adamw_applies(transposed, transposed.grad(), transposed_state->exp_avg(),
                                          transposed_state->exp_avg_sq()));

  check_same(params, fused.optimizer(), reference_params, reference, 1e-6);
  // A parameter without a gradient keeps its value and gets no state; a zero gradient still decays the weight.
  CHECK(torch::equal(params[1].back(), untouched));
  CHECK(state_of(fused.optimizer(), params[1].back()) == nullptr);
  CHECK(!torch::equal(params[0].back(), zero_grad_before));
  CHECK(state_of(fused.optimizer(), params[0].back())->step() == 6);
}

TEST_CASE("GroupedAdamW: clip_grad_norm gives clip_grad_norm_'s norm and factor, applied now or in the step") {
  auto params = make_parameters();  // every layout: fused and torch's paths, several chunks, no gradient, zero one
  auto eager_params = copy_parameters(params), torch_params = copy_parameters(params);
  const std::vector<double> lrs = {3e-3, 1e-2};
  auto deferred = grouped_adamw(params, lrs), eager = grouped_adamw(eager_params, lrs);
  for (int64_t step = 0; step < 3; ++step) {
    CAPTURE(step);
    set_gradients({&params, &eager_params, &torch_params}, step);
    std::vector<torch::Tensor> all, with_grad;
    for (const auto& group : torch_params)
      for (const auto& p : group) {
        all.push_back(p);
        if (p.grad().defined()) with_grad.push_back(p);
      }
    const double max_norm = step == 2 ? 1e6 : 2.0;  // the last step does not clip
    const double expected = torch::nn::utils::clip_grad_norm_(all, max_norm);
    REQUIRE(expected > 10);  // random gradients of ~95k values: the first steps clip
    const double norm = deferred.clip_grad_norm(max_norm, /*defer_scale=*/true);
    CHECK(norm == doctest::Approx(expected).epsilon(1e-6));
    CHECK(eager.clip_grad_norm(max_norm) == norm);
    // Eager: the gradients are torch's clipped ones (the factor from a norm equal up to fp32 summation order).
    for (size_t g = 0; g < params.size(); ++g)
      for (size_t i = 0; i < params[g].size(); ++i) {
        CAPTURE(g);
        CAPTURE(i);
        const auto& grad = eager_params[g][i].grad();
        REQUIRE(grad.defined() == torch_params[g][i].grad().defined());
        if (!grad.defined()) continue;
        CHECK(relative_difference(grad, torch_params[g][i].grad()) <= 1e-6);
        // Deferred: the gradients untouched until the step, so unlike the clipped ones (but a zero gradient).
        if (step < 2 && grad.abs().max().item<double>() > 0) CHECK(!torch::equal(params[g][i].grad(), grad));
      }
    deferred.step();
    eager.step();
    for (size_t g = 0; g < params.size(); ++g)
      for (size_t i = 0; i < params[g].size(); ++i) CHECK(torch::equal(params[g][i], eager_params[g][i]));
  }
  // A NaN gradient gives a NaN norm.
  params[0][0].mutable_grad() = torch::full_like(params[0][0], std::numeric_limits<float>::quiet_NaN());
  CHECK(std::isnan(deferred.clip_grad_norm(1.0, true)));
}

TEST_CASE("GroupedAdamW: zero_grad drops the gradients, and a parameter without a new one is not stepped") {
  torch::manual_seed(3);
  auto used = leaf(torch::randn({4, 8})), unused = leaf(torch::randn({8}));
  const auto x = torch::randn({4, 8});
  rlhf::GroupedAdamW optimizer;
  optimizer.add("all", {used, unused}, 1e-2).build("optimizer_test");
  ((used * x).sum() + (unused * x[0]).sum()).backward();
  optimizer.step();
  optimizer.zero_grad();
  CHECK_FALSE(used.grad().defined());
  CHECK_FALSE(unused.grad().defined());

  const auto unused_before = unused.detach().clone();
  (used * x * 2).sum().backward();
  REQUIRE(used.grad().defined());
  CHECK(torch::equal(used.grad(), x * 2));  // this backward's gradient alone, not added to the last one's
  CHECK_FALSE(unused.grad().defined());
  optimizer.step();
  CHECK(torch::equal(unused, unused_before));  // no gradient: no decay, no momentum step
  CHECK(state_of(optimizer.optimizer(), unused)->step() == 1);
  CHECK(state_of(optimizer.optimizer(), used)->step() == 2);
}

TEST_CASE("GroupedAdamW: torch's operations for bf16 parameters and amsgrad") {
  SUBCASE("bf16") {
    Groups params = {{leaf(torch::randn({33, 17}).to(torch::kBFloat16))},
                                                      {leaf(torch::randn({40}).to(torch::kBFloat16))}};
    auto reference_params = copy_parameters(params);
    const std::vector<double> lrs = {1e-2, 2e-2};
    auto fused = grouped_adamw(params, lrs);
    auto reference = torch_adamw(reference_params, lrs);
    for (int64_t step = 0; step < 3; ++step) {
      for (size_t g = 0; g < params.size(); ++g) {
        auto grad = torch::randn_like(params[g][0]);
        params[g][0].mutable_grad() = grad.clone();
        reference_params[g][0].mutable_grad() = grad.clone();
      }
      fused.step();
      reference.step();
    }
    check_same(params, fused.optimizer(), reference_params, reference, 0.0);
  }
  SUBCASE("amsgrad") {
    auto params = make_parameters();
    auto reference_params = copy_parameters(params);
    const std::vector<double> lrs = {3e-3, 1e-2};
    auto fused = grouped_adamw(params, lrs);
    auto reference = torch_adamw(reference_params, lrs);
    for (auto* optimizer : {&fused.optimizer(), &reference})
      for (auto& group : optimizer->param_groups())
        static_cast<torch::optim::AdamWOptions&>(group.options()).amsgrad(true);
    for (int64_t step = 0; step < 4; ++step) {
      set_gradients({&params, &reference_params}, step);
      fused.step();
      reference.step();
    }
    check_same(params, fused.optimizer(), reference_params, reference, 0.0);
  }
}

TEST_CASE("GroupedAdamW: a fused step changes its tensors in place as torch does") {
  auto p = leaf(torch::randn({64}));
  rlhf::GroupedAdamW optimizer;
  optimizer.add("all", {p}, 1e-3).build("optimizer test");
  auto y = (p * p).sum();  // saves p for the backward
  p.mutable_grad() = torch::ones_like(p);
  const auto version = p._version();
  optimizer.step();
  CHECK(p._version() > version);
  CHECK_THROWS(y.backward());  // p was modified after it was saved
}

TEST_CASE("GroupedAdamW: optimizer state saved and loaded continues identically") {
  rlhf::test::TempDir dir;
  auto params = make_parameters();
  auto reference_params = copy_parameters(params);
  const std::vector<double> lrs = {3e-3, 1e-2};
  auto first = grouped_adamw(params, lrs);
  auto reference = torch_adamw(reference_params, lrs);
  for (int64_t step = 0; step < 3; ++step) {
    set_gradients({&params, &reference_params}, step);
    first.step();
    reference.step();
  }
  first.save(dir / "optimizer.pt");
  {
    torch::serialize::OutputArchive archive;  // what the previous version (torch's step) saved
    reference.save(archive);
    archive.save_to((dir / "torch.pt").string());
  }

  // Resumed from the saved state: the same parameters, a fresh optimiser.
  auto resumed_params = copy_parameters(params);
  auto resumed = grouped_adamw(resumed_params, lrs);
  resumed.load(dir / "optimizer.pt");
  // A checkpoint written by torch::optim::AdamW loads into GroupedAdamW, and GroupedAdamW's into torch's.
  auto from_torch_params = copy_parameters(reference_params);
  auto from_torch = grouped_adamw(from_torch_params, lrs);
  from_torch.load(dir / "torch.pt");
  auto into_torch_params = copy_parameters(params);
  auto into_torch = torch_adamw(into_torch_params, lrs);
  {
    torch::serialize::InputArchive archive;
    archive.load_from((dir / "optimizer.pt").string());
    into_torch.load(archive);
  }
  check_same(resumed_params, resumed.optimizer(), params, first.optimizer(), 0.0);

  for (int64_t step = 3; step < 6; ++step) {
    set_gradients({&params, &resumed_params, &into_torch_params}, step);
    set_gradients({&reference_params, &from_torch_params}, step);
    first.step();
    resumed.step();
    reference.step();
    from_torch.step();
    into_torch.step();
  }
  check_same(resumed_params, resumed.optimizer(), params, first.optimizer(), 0.0);
  check_same(from_torch_params, from_torch.optimizer(), reference_params, reference, 1e-6);
  check_same(resumed_params, resumed.optimizer(), into_torch_params, into_torch, 1e-6);
}
