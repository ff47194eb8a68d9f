#pragma once
/// @file The objective of a sweep: one number (higher is better) from a run's logged statistics.
///
/// Default: the mean of `reward_mean` over the last 5 logged phases minus 1.0 x max(0, mean KL over the same phases
/// - 0), i.e. final reward minus final KL to the reference model:
///
///     objective = mean_last_k(metric) - kl_penalty * max(0, mean_last_k(kl_metric) - kl_budget)
///
/// With kl_budget > 0 the KL is free up to the budget and penalised beyond it ("the highest reward at bounded KL");
/// kl_penalty = 0 optimises the reward alone. A run with no records of the metric, or whose metric or KL is NaN or
/// infinite in the window (a diverged run, logged as null), has no objective: the sweep records it as failed.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>

namespace rlhf::sweep {

/// How a run's statistics become the sweep's objective (see the file comment for the formula).
struct ObjectiveConfig {
  std::string metric = "reward_mean";  ///< the metric maximised, e.g. "reward_mean" (or "gold_mean")
  std::string kl_metric = "kl";        ///< the KL metric penalised, e.g. "kl"; "" = no penalty
  int64_t last = 5;                    ///< average over the last k records holding the metric, e.g. 5
  double kl_penalty = 1.0;             ///< beta: objective units per unit of KL above the budget, e.g. 1.0
  double kl_budget = 0.0;              ///< KL allowed without penalty, e.g. 0.5

  /// Throws rlhf::Error for an empty metric, last < 1 or a negative penalty or budget.
  void validate() const {
    if (metric.empty()) rlhf::detail::fail("objective: metric must name a logged statistic, e.g. reward_mean");
    if (last < 1) rlhf::detail::fail("objective: last must be at least 1, got {}", last);
    if (!(kl_penalty >= 0) || !(kl_budget >= 0))
      rlhf::detail::fail("objective: kl_penalty and kl_budget must be >= 0, got {} and {}", kl_penalty, kl_budget);
  }
};

template <class V>
void visit_fields(ObjectiveConfig& c, V&& v) {
  v("metric", c.metric, "logged statistic maximised, averaged over the last records");
  v("kl_metric", c.kl_metric, "logged KL statistic penalised (\"\" = none)");
  v("last", c.last, "records averaged at the end of each run");
  v("kl_penalty", c.kl_penalty, "beta: objective = metric - beta * max(0, KL - kl_budget)");
  v("kl_budget", c.kl_budget, "KL allowed without penalty");
}

/// The objective of one run and its parts.
struct ObjectiveValue {
  double value = std::numeric_limits<double>::quiet_NaN();   ///< the objective; NaN when the run failed
  double metric = std::numeric_limits<double>::quiet_NaN();  ///< mean of the metric over the window
  double kl = std::numeric_limits<double>::quiet_NaN();      ///< mean KL over the window (NaN without kl_metric)
  int64_t records = 0;                                       ///< records averaged
  std::string failure;                                       ///< why there is no objective ("" when there is)

  /// Whether the objective is finite.
  bool ok() const { return failure.empty() && std::isfinite(value); }

  /// {"objective", "<metric>", "<kl_metric>", "records"} for results.jsonl (NaN as null).
  nlohmann::json to_json(const ObjectiveConfig& config) const {
    auto number = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
    nlohmann::json out = {{"objective", number(value)}, {config.metric, number(metric)}, {"records", records}};
    if (!config.kl_metric.empty()) out[config.kl_metric] = number(kl);
    return out;
  }
};

/// The objective of a run from its metrics records (run::read_metrics() of metrics.jsonl, in step order): the
/// window is the last `config.last` records that hold the metric. A missing metric, a non-number (null: NaN or
/// infinite) metric or KL in the window, or a non-finite result gives a failure instead of throwing, so one bad run
/// does not stop a sweep.
inline ObjectiveValue evaluate_objective(const ObjectiveConfig& config, const std::vector<nlohmann::json>& records) {
  config.validate();
  ObjectiveValue out;
  std::vector<const nlohmann::json*> window;
  for (auto it = records.rbegin(); it != records.rend() && static_cast<int64_t>(window.size()) < config.last; ++it)
    if (it->is_object() && it->contains(config.metric)) window.push_back(&*it);
  if (window.empty()) {
    out.failure = fmt::format("no logged records hold '{}'", config.metric);
    return out;
  }
  auto step_of = [](const nlohmann::json& r) { return r.contains("step") ? r["step"].dump() : std::string("?"); };
  double metric_sum = 0.0, kl_sum = 0.0;
  for (const auto* r : window) {
    const auto& m = (*r)[config.metric];
    if (!m.is_number() || !std::isfinite(m.get<double>())) {
      out.failure =
          fmt::format("diverged: '{}' is {} at step {}", config.metric, m.is_null() ? "NaN" : m.dump(), step_of(*r));
      return out;
    }
    metric_sum += m.get<double>();
    if (!config.kl_metric.empty()) {
      const auto it = r->find(config.kl_metric);
      if (it == r->end()) {
        out.failure =
            fmt::format("the record at step {} holds '{}' but not '{}'", step_of(*r), config.metric, config.kl_metric);
        return out;
      }
      if (!it->is_number() || !std::isfinite(it->get<double>())) {
        out.failure = fmt::format("diverged: '{}' is {} at step {}", config.kl_metric,
                                  it->is_null() ? "NaN" : it->dump(), step_of(*r));
        return out;
      }
      kl_sum += it->get<double>();
    }
  }
  const auto k = static_cast<double>(window.size());
  out.records = static_cast<int64_t>(window.size());
  out.metric = metric_sum / k;
  out.value = out.metric;
  if (!config.kl_metric.empty()) {
    out.kl = kl_sum / k;
    out.value -= config.kl_penalty * std::max(0.0, out.kl - config.kl_budget);
  }
  if (!std::isfinite(out.value)) out.failure = fmt::format("the objective is not finite ({})", out.value);
  return out;
}

}  // namespace rlhf::sweep
