#pragma once
/// @file The KL penalty of RLHF: per-token estimators of KL(policy || reference) from sampled tokens (Schulman,
/// "Approximating KL divergence", http://joschu.net/blog/kl-approx.html), the exact KL over the vocabulary, and the
/// controllers of its coefficient (fixed, or adaptive as in Ziegler et al. 2019, arXiv 1909.08593).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <rlhf/core/logprobs.hpp>
#include <rlhf/core/masked.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf {

// ---- per-token estimators ----

/// Estimators of KL(pi || pi_ref) from one token x ~ pi, with d = log pi_ref(x) - log pi(x) = log r
/// (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html). All three have expectation
/// KL(pi || pi_ref) under pi or close to it:
enum class KLEstimator {
  k1,  ///< -d = logp - ref_logp: unbiased, high variance, can be negative (TRL's "kl" penalty)
  k2,  ///< d^2 / 2: biased (low bias when the policies are close), low variance, never negative (TRL's "mse")
  k3,  ///< (r - 1) - log r = expm1(d) - d: unbiased, low variance, never negative (TRL's "low_var_kl" / GRPO)
};

/// The per-token KL estimate of `estimator` from the log-probabilities of the sampled tokens under the policy `logp`
/// and the reference `ref_logp`, both [B, T] (any equal shapes): k1 = logp - ref_logp, k2 = 0.5 (logp - ref_logp)^2,
/// k3 = (exp(ref_logp - logp) - 1) - (ref_logp - logp). Elementwise, in the promoted dtype of the inputs (at least
/// float32); differentiable. Mask and reduce the result yourself (masked_mean or a per-token reward penalty).
inline torch::Tensor kl_per_token(const torch::Tensor& logp, const torch::Tensor& ref_logp, KLEstimator estimator) {
  detail::ppo_math::check_same_shape("kl_per_token", "logp", logp, "ref_logp", ref_logp);
  const auto dtype =
      torch::promote_types(torch::promote_types(logp.scalar_type(), ref_logp.scalar_type()), torch::kFloat);
  auto log_ratio = logp.to(dtype) - ref_logp.to(dtype);  // [B, T] log pi(x) - log pi_ref(x) = -d
  switch (estimator) {
    case KLEstimator::k1:
      return log_ratio;
    case KLEstimator::k2:
      return 0.5 * log_ratio * log_ratio;
    case KLEstimator::k3: {
      auto d = -log_ratio;                // [B, T] log r
      return torch::expm1(d) - d;         // (r - 1) - log r, accurate for small d
    }
  }
  detail::fail("kl_per_token: unknown KLEstimator {}", static_cast<int>(estimator));
}

/// The exact KL(softmax(logits) || softmax(ref_logits)) = sum_v p_v (log p_v - log q_v) over the last dimension:
/// [...] from logits and ref_logits [..., V] (typically [B, T, V] -> [B, T]). This is the seed notebook's
/// `calc_kl_penalty` before its mean and coefficient. Computed in float32 (double stays double) row chunk by row chunk;
/// entries with p_v = 0 count as 0 (a masked vocabulary keeps finite values and gradients). Differentiable with
/// respect to both; pass reference logits without autograd history.
inline torch::Tensor full_kl(const torch::Tensor& logits, const torch::Tensor& ref_logits) {
  detail::ppo_math::check_same_shape("full_kl", "logits", logits, "ref_logits", ref_logits);
  if (logits.dim() < 1) detail::fail("full_kl: logits must be [..., V], got []");
  const int64_t V = logits.size(-1);
  auto lead = logits.sizes().slice(0, logits.dim() - 1).vec();  // [...]
  const auto dtype = detail::ppo_math::stats_dtype(
      torch::promote_types(logits.scalar_type(), ref_logits.scalar_type()));
  auto p_rows = logits.reshape({-1, V});      // [N, V]
  auto q_rows = ref_logits.reshape({-1, V});  // [N, V]
  const int64_t N = p_rows.size(0);
  if (N == 0) return torch::zeros(lead, logits.options().dtype(dtype));
  std::vector<torch::Tensor> parts;
  detail::ppo_math::for_each_chunk(p_rows, [&](int64_t s, int64_t n) {
    auto log_p = torch::log_softmax(p_rows.narrow(0, s, n).to(dtype), -1);  // [n, V]
    auto log_q = torch::log_softmax(q_rows.narrow(0, s, n).to(dtype), -1);  // [n, V]
    auto p = log_p.exp();                                                   // [n, V]
    auto diff = (log_p - log_q).masked_fill(p.eq(0), 0);                    // [n, V] 0 where p = 0
    parts.push_back((p * diff).sum(-1));                                    // [n]
  });
  return torch::cat(parts).reshape(lead);
}

// ---- coefficient controllers ----

/// What the trainer needs from a KL-coefficient controller: `value()` is the current coefficient beta of the penalty
/// reward -beta * KL, and `update(kl, n_steps)` feeds it the mean KL measured over the last batch of `n_steps` samples.
template <class T>
concept KLController = requires(T c, const T cc, double kl, int64_t n) {
  { cc.value() } -> std::convertible_to<double>;
  c.update(kl, n);
};

/// A constant KL coefficient (Ziegler et al. 2019, arXiv 1909.08593, the non-adaptive variant).
class FixedKL {
 public:
  /// Settings, e.g. `rlhf::FixedKL{{.coef = 0.1}}`.
  struct Options {
    double coef = 0.2;  // beta, the weight of the KL penalty; >= 0
  };

  /// The default coefficient 0.2.
  FixedKL() : FixedKL(Options{}) {}
  /// Throws when coef is negative or not finite.
  explicit FixedKL(Options options) : options_(options) { validate(options_, "FixedKL"); }

  /// The coefficient.
  double value() const { return options_.coef; }
  /// Does nothing: the coefficient is fixed.
  void update(double /*kl*/, int64_t /*n_steps*/) {}
  /// The settings.
  const Options& options() const { return options_; }

  /// The controller as JSON, {"kind": "fixed", "coef": 0.2}, for checkpoints.
  nlohmann::json state() const { return {{"kind", "fixed"}, {"coef", options_.coef}}; }
  /// Restores a state written by state(); throws (naming the field) on another kind or a missing or bad field.
  void load_state(const nlohmann::json& state) {
    if (!state.is_object() || !state.contains("kind") || !state["kind"].is_string() || state["kind"] != "fixed")
      detail::fail("FixedKL::load_state: expected an object with \"kind\": \"fixed\", got {}", state.dump());
    if (!state.contains("coef") || !state["coef"].is_number())
      detail::fail("FixedKL::load_state: field 'coef' is missing or not a number in {}", state.dump());
    Options o{.coef = state["coef"].get<double>()};
    validate(o, "FixedKL::load_state");
    options_ = o;
  }

 private:
  static void validate(const Options& o, const char* where) {
    if (!(o.coef >= 0.0) || !std::isfinite(o.coef))
      detail::fail("{}: Options.coef must be a finite non-negative number, got {}", where, o.coef);
  }

  Options options_;
};

/// The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences",
/// arXiv 1909.08593, section 2.2), as TRL's AdaptiveKLController: after each batch with mean KL `kl` over `n_steps`
/// samples,
///
///     error = clip(kl / target - 1, -0.2, 0.2),    beta <- beta * (1 + error * n_steps / horizon),
///
/// so beta grows while the policy drifts further than `target` nats from the reference and shrinks otherwise.
class AdaptiveKL {
 public:
  /// Settings, e.g. `rlhf::AdaptiveKL{{.init = 0.2, .target = 6.0, .horizon = 10000}}`.
  struct Options {
    double init = 0.2;        // the initial coefficient beta_0; >= 0
    double target = 6.0;      // the KL (nats per sequence) to hold; > 0
    double horizon = 10000;   // samples over which a 20% error changes beta by ~e^0.2; > 0
  };

  /// The defaults of Ziegler et al. (init 0.2, target 6, horizon 10000).
  AdaptiveKL() : AdaptiveKL(Options{}) {}
  /// Throws naming the field when init is negative or target or horizon is not positive.
  explicit AdaptiveKL(Options options) : options_(options), value_(options.init) { validate(options_, "AdaptiveKL"); }

  /// The current coefficient beta.
  double value() const { return value_; }

  /// One step of the controller (formula above) with the measured mean KL `kl` over `n_steps` samples. Throws when
  /// kl is not finite (a diverged run would otherwise turn beta into NaN for good) or n_steps is negative.
  void update(double kl, int64_t n_steps) {
    if (!std::isfinite(kl)) detail::fail("AdaptiveKL::update: kl must be finite, got {}", kl);
    if (n_steps < 0) detail::fail("AdaptiveKL::update: n_steps must be non-negative, got {}", n_steps);
    const double error = std::clamp(kl / options_.target - 1.0, -0.2, 0.2);
    value_ *= 1.0 + error * static_cast<double>(n_steps) / options_.horizon;
  }

  /// The settings.
  const Options& options() const { return options_; }

  /// The controller as JSON, {"kind": "adaptive", "value": beta, "init": ..., "target": ..., "horizon": ...}.
  nlohmann::json state() const {
    return {{"kind", "adaptive"},
            {"value", value_},
            {"init", options_.init},
            {"target", options_.target},
            {"horizon", options_.horizon}};
  }
  /// Restores a state written by state(), coefficient included; throws (naming the field) on another kind or a
  /// missing or bad field.
  void load_state(const nlohmann::json& state) {
    if (!state.is_object() || !state.contains("kind") || !state["kind"].is_string() || state["kind"] != "adaptive")
      detail::fail("AdaptiveKL::load_state: expected an object with \"kind\": \"adaptive\", got {}", state.dump());
    Options o{.init = number(state, "init"), .target = number(state, "target"), .horizon = number(state, "horizon")};
    validate(o, "AdaptiveKL::load_state");
    const double value = number(state, "value");
    if (!(value >= 0.0) || !std::isfinite(value))
      detail::fail("AdaptiveKL::load_state: field 'value' must be a finite non-negative number, got {}", value);
    options_ = o;
    value_ = value;
  }

 private:
  static double number(const nlohmann::json& state, const char* field) {
    if (!state.contains(field) || !state[field].is_number())
      detail::fail("AdaptiveKL::load_state: field '{}' is missing or not a number in {}", field, state.dump());
    return state[field].get<double>();
  }
  static void validate(const Options& o, const char* where) {
    if (!(o.init >= 0.0) || !std::isfinite(o.init))
      detail::fail("{}: Options.init must be a finite non-negative number, got {}", where, o.init);
    if (!(o.target > 0.0) || !std::isfinite(o.target))
      detail::fail("{}: Options.target must be a finite positive number, got {}", where, o.target);
    if (!(o.horizon > 0.0) || !std::isfinite(o.horizon))
      detail::fail("{}: Options.horizon must be a finite positive number, got {}", where, o.horizon);
  }

  Options options_;
  double value_;
};

/// Which controller a config file asks for.
enum class KLControl { fixed, adaptive };

/// The KL slot filled at run time: a FixedKL or an AdaptiveKL chosen by a config file behind one type, so one
/// PPOTrainer instantiation serves both (the `rlhf ppo` tool's `kl.controller`). Behaves exactly as the chosen
/// controller, checkpoints included: state() is its state, and load_state() refuses a state of the other kind.
class ConfiguredKL {
 public:
  /// Settings, e.g. `{.controller = KLControl::adaptive, .init = 0.05, .target = 6.0}`.
  struct Options {
    KLControl controller = KLControl::adaptive;  // fixed: beta stays `init`; adaptive: Ziegler et al.'s rule
    double init = 0.2;                           // the (initial) coefficient beta
    double target = 6.0;                         // adaptive only: the KL (nats per sequence) to hold
    double horizon = 10000;                      // adaptive only: samples over which beta adapts
  };

  /// Builds the chosen controller; throws as FixedKL / AdaptiveKL do on bad settings.
  explicit ConfiguredKL(const Options& o)
      : controller_(o.controller == KLControl::fixed
                        ? Variant(FixedKL({.coef = o.init}))
                        : Variant(AdaptiveKL({.init = o.init, .target = o.target, .horizon = o.horizon}))) {}

  /// The current coefficient beta.
  double value() const { return std::visit([](const auto& c) { return c.value(); }, controller_); }
  /// Feeds the chosen controller (see FixedKL::update, AdaptiveKL::update).
  void update(double kl, int64_t n_steps) { std::visit([&](auto& c) { c.update(kl, n_steps); }, controller_); }
  /// The chosen controller's state, e.g. {"kind": "adaptive", "value": ..., ...}.
  nlohmann::json state() const { return std::visit([](const auto& c) { return c.state(); }, controller_); }
  /// Restores the chosen controller's state (throws on a state of the other kind).
  void load_state(const nlohmann::json& state) {
    std::visit([&](auto& c) { c.load_state(state); }, controller_);
  }

 private:
  using Variant = std::variant<FixedKL, AdaptiveKL>;
  Variant controller_;
};

static_assert(KLController<FixedKL>, "FixedKL must model rlhf::KLController");
static_assert(KLController<ConfiguredKL>, "ConfiguredKL must model rlhf::KLController");
static_assert(KLController<AdaptiveKL>, "AdaptiveKL must model rlhf::KLController");

}  // namespace rlhf
