#pragma once
/// @file `rlhf sweep`: a sweep whose trials are PPO stage runs (pipeline/stages.hpp run_ppo), each in its own run
/// folder under the sweep folder, scored by the objective (objective.hpp) on its metrics.jsonl.
///
/// The configuration (TOML or JSON, see docs/sweeps.md):
///
///     out = "runs/sweep-kl"
///     budget = 16
///     [searcher]            # SearcherConfig: kind = bayes | random | grid, seed, ...
///     kind = "bayes"
///     [objective]           # ObjectiveConfig: metric, kl_metric, last, kl_penalty, kl_budget
///     kl_budget = 2.0
///     [[space]]             # one table per parameter; names are keys of [base]
///     name = "ppo.kl_coef"
///     kind = "log_uniform"
///     low = 0.01
///     high = 1.0
///     [base]                # the PPO stage's config (PPORunConfig), shared by every trial
///     reward.lexicon = "data/sentiment_words.json"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/config/config_file.hpp>
#include <rlhf/pipeline/stages.hpp>
#include <rlhf/run/metrics.hpp>
#include <rlhf/sweep/objective.hpp>
#include <rlhf/sweep/search.hpp>
#include <rlhf/sweep/space.hpp>
#include <rlhf/sweep/sweep.hpp>

namespace rlhf::sweep {

/// The configuration of `rlhf sweep` over the PPO stage. `space` is read by SearchSpace::from_json (it is not a
/// visit_fields struct); everything else binds strictly like the stages' configs.
struct PPOSweepConfig {
  std::string out = "runs/sweep";  ///< the sweep folder
  int64_t budget = 12;             ///< trials in all, e.g. 12
  int64_t stop_after = 0;          ///< end this session after so many new trials (0 = run to the budget)
  SearcherConfig searcher;         ///< grid, random or bayes and their settings
  ObjectiveConfig objective;       ///< how a trial's metrics become its score
  pipeline::PPORunConfig base;     ///< the PPO run every trial starts from (its `out` is replaced per trial)
  SearchSpace space;               ///< the parameters searched; names are dotted keys of `base`
};

template <class V>
void visit_fields(PPOSweepConfig& c, V&& v) {
  v("out", c.out, "sweep folder (trials in out/trials/trial-NNNN)");
  v("budget", c.budget, "trials in all");
  v("stop_after", c.stop_after,
    "end this session after so many new trials (0 = run to the budget); --resume continues");
  v("searcher", c.searcher);
  v("objective", c.objective);
  v("base", c.base);
}

/// The resolved configuration as JSON (every key, the space as an array of parameter tables): sweep.json.
inline nlohmann::json resolved_config(const PPOSweepConfig& c) {
  nlohmann::json out = rlhf::config::to_json_config(c);
  out["space"] = c.space.to_json();
  return out;
}

/// The base config of one trial: `base` with the point's values set at their keys and `out` = `run_dir`, bound
/// strictly (a parameter name that is not a key of the PPO config is an error naming it).
inline pipeline::PPORunConfig trial_config(const PPOSweepConfig& c, const Point& point,
                                           const std::filesystem::path& run_dir, const std::string& source) {
  auto json = apply_point(rlhf::config::to_json_config(c.base), point);
  json["out"] = run_dir.string();
  return rlhf::config::from_json_config<pipeline::PPORunConfig>(json, source, "base");
}

/// Reads a sweep configuration from a loaded config file (`rlhf::config::load_config_file` + overrides): the
/// `space` array by SearchSpace::from_json, the rest by bind_config; then checks that every parameter is a key of
/// the PPO config and that each trial's config would validate, before anything runs.
inline PPOSweepConfig load_ppo_sweep_config(nlohmann::json json, const std::string& source) {
  if (!json.is_object()) rlhf::detail::fail("{}: expected a table of keys at the top level", source);
  PPOSweepConfig c;
  if (!json.contains("space"))
    rlhf::detail::fail(
        "{}: the sweep needs a search space ---> HINT: add [[space]] tables with name, kind and "
        "low/high or choices (docs/sweeps.md)",
        source);
  c.space = SearchSpace::from_json(json["space"], source);
  json.erase("space");
  rlhf::config::bind_config(json, c, source);
  c.objective.validate();
  if (c.budget < 1) rlhf::detail::fail("{}: key 'budget': must be at least 1, got {}", source, c.budget);
  const auto probe = trial_config(c, c.space.from_unit(std::vector<double>(c.space.size(), 0.5)), c.out, source);
  probe.ppo.validate();
  return c;
}

/// Runs (or resumes) the sweep: each trial is run_ppo on trial_config() in out/trials/trial-NNNN (resumed from its
/// checkpoint when an earlier session stopped inside it), scored by the objective on its metrics.jsonl. Ctrl-C ends
/// the running trial with a checkpoint and stops the sweep (completed = false).
inline SweepResult run_ppo_sweep(const PPOSweepConfig& c, bool resume = false,
                                 std::function<void(const Trial&)> on_trial = {}) {
  auto searcher = make_searcher(c.searcher, c.space);
  SweepOptions options{
      .out = c.out,
      .budget = c.budget,
      .stop_after = c.stop_after,
      .resume = resume,
      .config = resolved_config(c),
      .resumable_keys = {"/budget", "/stop_after"},
      .title = fmt::format("sweep {}", std::filesystem::path(c.out).filename().string()),
      .notes = fmt::format(
          "Objective: mean `{}` over the last {} logged phases{}.", c.objective.metric, c.objective.last,
          c.objective.kl_metric.empty() ? std::string()
                                        : fmt::format(" minus {} x max(0, mean `{}` - {})", c.objective.kl_penalty,
                                                      c.objective.kl_metric, c.objective.kl_budget)),
      .on_trial = std::move(on_trial)};
  return run_sweep(options, *searcher, [&](const TrialContext& t) {
    const auto config = trial_config(c, t.point, t.run_dir, fmt::format("{}/sweep.json", c.out));
    const auto stage = pipeline::run_ppo(config, t.resume);
    if (!stage.completed) return TrialOutcome{.interrupted = true};
    const auto score = evaluate_objective(c.objective, run::read_metrics(t.run_dir / "metrics.jsonl"));
    return TrialOutcome{.objective = score.ok() ? score.value : std::numeric_limits<double>::quiet_NaN(),
                        .metrics = score.to_json(c.objective),
                        .error = score.failure};
  });
}

}  // namespace rlhf::sweep
