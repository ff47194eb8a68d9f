#pragma once
/// @file The sweep runner: asks a searcher for points, runs each as a trial in its own run folder, and keeps a
/// results table that makes the sweep resumable after an interruption.
///
///     SWEEP/
///       sweep.json            the resolved sweep configuration (resume checks it)
///       results.jsonl         one line per finished trial, rewritten atomically after each trial
///       summary.md            the best trial's parameters and a table of every trial
///       plot.png              objective and best-so-far against the trial index, and where each trial was
///       trials/trial-0000/    the trials' run folders (for PPO: config.json, metrics.jsonl, checkpoints/, ...)
///
/// Resuming reloads results.jsonl; since the searchers are deterministic functions of their seed and the history,
/// the next trials are the ones an uninterrupted sweep would have run. A trial whose folder exists but which is not
/// in results.jsonl (the process stopped during it) is run again with TrialContext::resume set, so a trial function
/// that can resume its run (run_ppo with resume) continues from the run's checkpoint.

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/run/interrupt.hpp>
#include <rlhf/run/plot.hpp>
#include <rlhf/run/run_dir.hpp>
#include <rlhf/sweep/objective.hpp>
#include <rlhf/sweep/search.hpp>
#include <rlhf/sweep/space.hpp>

namespace rlhf::sweep {

// ---- choosing a searcher ----

/// The search strategies.
enum class SearcherKind {
  grid,    ///< GridSearch
  random,  ///< RandomSearch
  bayes,   ///< BayesianSearch
};

/// The names of SearcherKind in config files.
constexpr auto enum_names(SearcherKind) {
  using Name = std::pair<std::string_view, SearcherKind>;
  return std::array{Name{"bayes", SearcherKind::bayes}, Name{"random", SearcherKind::random},
                    Name{"grid", SearcherKind::grid}, Name{"bayesian", SearcherKind::bayes}};
}

/// Which searcher a sweep uses and its settings (the [searcher] table).
struct SearcherConfig {
  SearcherKind kind = SearcherKind::bayes;  ///< grid, random or bayes
  uint64_t seed = 0;                        ///< seeds random draws, the initial design and EI candidates
  int64_t grid_points = 3;                  ///< grid: values per continuous axis, e.g. 3
  int64_t initial = 0;                      ///< bayes: initial design size; 0 = max(4, 2 x dimensions)
  int64_t candidates = 2000;                ///< bayes: random EI candidates per suggestion, e.g. 2000
  double xi = 0.01;                         ///< bayes: EI exploration margin (standardised units), e.g. 0.01
};

template <class V>
void visit_fields(SearcherConfig& c, V&& v) {
  v("kind", c.kind, "grid, random or bayes (Gaussian process + expected improvement)");
  v("seed", c.seed, "seeds the random draws, the initial design and the EI candidates");
  v("grid_points", c.grid_points, "grid: values per continuous axis");
  v("initial", c.initial, "bayes: Latin-hypercube initial design size (0 = max(4, 2 x dimensions))");
  v("candidates", c.candidates, "bayes: random candidates scored by expected improvement per trial");
  v("xi", c.xi, "bayes: expected-improvement exploration margin");
}

/// The searcher `config` describes, over `space`.
inline std::unique_ptr<Searcher> make_searcher(const SearcherConfig& config, const SearchSpace& space) {
  switch (config.kind) {
    case SearcherKind::grid:
      return std::make_unique<GridSearch>(space, config.grid_points);
    case SearcherKind::random:
      return std::make_unique<RandomSearch>(space, config.seed);
    case SearcherKind::bayes:
      return std::make_unique<BayesianSearch>(
          space, BayesOptions{
                     .seed = config.seed, .initial = config.initial, .candidates = config.candidates, .xi = config.xi});
  }
  rlhf::detail::fail("sweep: unknown searcher kind");
}

// ---- the runner ----

/// Where and how long a sweep runs.
struct SweepOptions {
  std::filesystem::path out = "runs/sweep";  ///< the sweep folder
  int64_t budget = 20;                       ///< trials in all (a finished grid may end sooner), e.g. 20
  int64_t stop_after = 0;                    ///< end this session after so many new trials (0 = run to the budget)
  bool resume = false;                       ///< continue the sweep in `out` from its results.jsonl
  nlohmann::json config = nlohmann::json::object();  ///< the resolved sweep configuration, stored as sweep.json
  std::vector<std::string> resumable_keys = {"/budget", "/stop_after"};  ///< may differ from sweep.json on resume
  std::string title = "sweep";                                           ///< heading of summary.md and plot.png
  std::string notes;                           ///< Markdown put under the heading of summary.md (e.g. the objective)
  std::function<void(const Trial&)> on_trial;  ///< called after each finished trial (progress output)
};

/// What a trial function is given.
struct TrialContext {
  int64_t index = 0;              ///< 0, 1, 2, ...
  Point point;                    ///< the parameters to run with
  std::filesystem::path run_dir;  ///< SWEEP/trials/trial-NNNN: the trial's run folder (not yet created)
  bool resume = false;            ///< the folder exists from an interrupted session: continue it if possible
};

/// What a trial function returns.
struct TrialOutcome {
  double objective = std::numeric_limits<double>::quiet_NaN();  ///< higher is better; NaN = failed
  nlohmann::json metrics = nlohmann::json::object();            ///< summary statistics kept in results.jsonl
  std::string error;                                            ///< why the trial failed (set with a NaN objective)
  bool interrupted = false;  ///< the trial stopped early (Ctrl-C): not recorded, the sweep stops
};

/// The state of a sweep after run_sweep().
struct SweepResult {
  std::filesystem::path path;  ///< the sweep folder
  std::vector<Trial> trials;   ///< every finished trial, earlier sessions included
  std::optional<size_t> best;  ///< index into trials of the best one
  bool completed = false;      ///< the budget is spent (or the grid exhausted)
};

namespace detail {

/// A finite double as JSON, NaN and infinities as null.
inline nlohmann::json number_or_null(double x) {
  return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr);
}

/// The results.jsonl line of a trial.
inline std::string trial_line(const Trial& t, const std::filesystem::path& run_dir) {
  nlohmann::ordered_json line;
  line["trial"] = t.index;
  line["status"] = t.status;
  line["objective"] = number_or_null(t.objective);
  line["params"] = t.point;
  line["metrics"] = t.metrics;
  if (!t.error.empty()) line["error"] = t.error;
  line["seconds"] = t.seconds;
  line["run_dir"] = run_dir.string();
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// The trial folder name, relative to the sweep folder: "trials/trial-0007".
inline std::filesystem::path trial_dir_name(int64_t index) {
  return std::filesystem::path("trials") / fmt::format("trial-{:04d}", index);
}

/// The trials of a results.jsonl, checked against `space` (each index in order, each point in the space).
inline std::vector<Trial> read_results(const std::filesystem::path& path, const SearchSpace& space) {
  std::vector<Trial> trials;
  if (!std::filesystem::exists(path)) return trials;
  const std::string text = read_file(path);
  size_t begin = 0;
  for (int64_t line = 1; begin < text.size(); ++line) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) break;  // a torn last line: that trial is not finished
    const std::string row = text.substr(begin, end - begin);
    begin = end + 1;
    if (row.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(row);
    } catch (const nlohmann::json::parse_error& e) {
      rlhf::detail::fail("sweep: {}: line {}: not valid JSON: {}", path.string(), line, e.what());
    }
    if (!j.is_object() || !j.contains("trial") || !j["trial"].is_number_integer() || !j.contains("params"))
      rlhf::detail::fail("sweep: {}: line {}: expected an object with \"trial\" and \"params\"", path.string(), line);
    Trial t;
    t.index = j["trial"].get<int64_t>();
    if (t.index != static_cast<int64_t>(trials.size()))
      rlhf::detail::fail("sweep: {}: line {}: expected trial {}, found trial {}", path.string(), line, trials.size(),
                         t.index);
    t.point = j["params"];
    space.to_unit(t.point);  // throws when the point is not in the space
    t.objective = j.value("objective", nlohmann::json()).is_number() ? j["objective"].get<double>()
                                                                     : std::numeric_limits<double>::quiet_NaN();
    t.status = j.value("status", std::string("ok"));
    t.error = j.value("error", std::string());
    t.metrics = j.value("metrics", nlohmann::json::object());
    t.seconds = j.value("seconds", 0.0);
    trials.push_back(std::move(t));
  }
  return trials;
}

/// A value of a point for a Markdown table: numbers with 4 significant digits, strings as they are.
inline std::string format_value(const nlohmann::json& v) {
  if (v.is_number_float()) return fmt::format("{:.4g}", v.get<double>());
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

/// summary.md: the best trial and a table of every trial.
inline std::string summary_markdown(const SweepOptions& options, const Searcher& searcher,
                                    const std::vector<Trial>& trials, bool completed) {
  const auto best = best_trial(trials);
  size_t failed = 0;
  for (const auto& t : trials) failed += t.ok() ? 0 : 1;
  std::string md = fmt::format("# {}\n\n", options.title);
  if (!options.notes.empty()) md += options.notes + "\n\n";
  md += fmt::format("Searcher: {}. Trials: {} of {} ({} failed){}.\n\n", searcher.name(), trials.size(), options.budget,
                    failed, completed ? "" : ", unfinished: run again with --resume to continue");
  md += "## Best trial\n\n";
  if (!best) {
    md += "No trial has succeeded yet.\n\n";
  } else {
    const auto& b = trials[*best];
    md += fmt::format("Trial {}: objective {:.6g} (run folder `{}`).\n\n| parameter | value |\n| --- | --- |\n",
                      b.index, b.objective, trial_dir_name(b.index).string());
    for (const auto& p : searcher.space().params())
      md += fmt::format("| {} | {} |\n", p.name, format_value(b.point[p.name]));
    md += "\n";
  }
  md += "## Trials\n\n| trial | objective | status |";
  for (const auto& p : searcher.space().params()) md += fmt::format(" {} |", p.name);
  md += " seconds |\n| ---: | ---: | --- |";
  for (size_t i = 0; i < searcher.space().size(); ++i) md += " ---: |";
  md += " ---: |\n";
  for (const auto& t : trials) {
    md += fmt::format("| {}{} | {} | {} |", t.index, best && trials[*best].index == t.index ? " *" : "",
                      t.ok() ? fmt::format("{:.6g}", t.objective) : std::string("-"),
                      t.ok() ? std::string("ok") : fmt::format("failed: {}", t.error.substr(0, 80)));
    for (const auto& p : searcher.space().params()) md += fmt::format(" {} |", format_value(t.point[p.name]));
    md += fmt::format(" {:.1f} |\n", t.seconds);
  }
  return md;
}

/// plot.png: objective and best-so-far per trial, and each parameter's unit-cube position per trial.
inline void plot_sweep(const std::filesystem::path& path, const SweepOptions& options, const Searcher& searcher,
                       const std::vector<Trial>& trials) {
  run::Series objective{.name = "objective", .x = {}, .y = {}}, best{.name = "best so far", .x = {}, .y = {}};
  double running = -std::numeric_limits<double>::infinity();
  for (const auto& t : trials) {
    objective.x.push_back(static_cast<double>(t.index));
    objective.y.push_back(t.ok() ? t.objective : std::numeric_limits<double>::quiet_NaN());
    if (t.ok()) running = std::max(running, t.objective);
    best.x.push_back(static_cast<double>(t.index));
    best.y.push_back(std::isfinite(running) ? running : std::numeric_limits<double>::quiet_NaN());
  }
  run::Panel params{.title = "parameters (position in their range, 0 = low, 1 = high)", .series = {}};
  for (size_t j = 0; j < searcher.space().size(); ++j) {
    run::Series s{.name = searcher.space().params()[j].name, .x = {}, .y = {}};
    for (const auto& t : trials) {
      s.x.push_back(static_cast<double>(t.index));
      s.y.push_back(searcher.space().to_unit(t.point)[j]);
    }
    params.series.push_back(std::move(s));
  }
  run::plot_png(path, options.title, {run::Panel{.title = "objective", .series = {objective, best}}, std::move(params)},
                {.x_label = "trial"});
}

/// Creates the sweep folder (new sweep) or checks sweep.json against the configuration (resume).
inline void open_sweep_folder(const SweepOptions& options) {
  const auto config_path = options.out / "sweep.json";
  if (!options.resume) {
    if (std::filesystem::exists(config_path))
      rlhf::detail::fail(
          "sweep: {}: the folder already holds a sweep (sweep.json)\n---> HINT: pass --resume to "
          "continue it, or choose another output folder",
          options.out.string());
    if (std::filesystem::exists(options.out) && !std::filesystem::is_empty(options.out))
      rlhf::detail::fail(
          "sweep: {}: the folder is not empty but holds no sweep (no sweep.json)\n---> HINT: choose "
          "a new or empty output folder",
          options.out.string());
    std::filesystem::create_directories(options.out / "trials");
    write_file_atomic(config_path, options.config.dump(2) + "\n");
    return;
  }
  if (!std::filesystem::exists(config_path))
    rlhf::detail::fail(
        "sweep: {}: cannot resume: there is no sweep in this folder (no sweep.json)\n---> HINT: drop "
        "--resume to start a new sweep there",
        options.out.string());
  nlohmann::json stored;
  try {
    stored = nlohmann::json::parse(read_file(config_path));
  } catch (const nlohmann::json::parse_error& e) {
    rlhf::detail::fail("sweep: {}: cannot resume: not valid JSON: {}", config_path.string(), e.what());
  }
  std::vector<std::string> refused;
  for (const auto& d : run::config_differences(stored, options.config)) {
    bool allowed = false;
    for (const auto& key : options.resumable_keys)
      allowed = allowed || d.pointer == key || d.pointer.starts_with(key + "/");
    if (!allowed) refused.push_back(fmt::format("{} (stored {}, given {})", d.pointer, d.stored, d.given));
  }
  if (!refused.empty())
    rlhf::detail::fail(
        "sweep: {}: cannot resume: the configuration differs from the stored one at {}\n---> HINT: "
        "resume with the stored settings or start a new sweep; settings that may change on resume: {}",
        config_path.string(), fmt::join(refused, ", "), fmt::join(options.resumable_keys, ", "));
  if (stored != options.config) write_file_atomic(config_path, options.config.dump(2) + "\n");
  std::filesystem::create_directories(options.out / "trials");
}

}  // namespace detail

/// Runs (or resumes) a sweep: until `options.budget` trials have finished, the searcher exhausts, `stop_after` new
/// trials have run, or Ctrl-C: asks `searcher` for the next point, calls `trial(context)` (a callable
/// `TrialOutcome(const TrialContext&)`), records the trial in results.jsonl (rewritten atomically) and redraws
/// summary.md and plot.png. A trial that throws (std::exception) or returns a NaN objective is recorded as failed
/// and the sweep goes on; a trial that returns `interrupted` is not recorded and the sweep stops (completed =
/// false), to be resumed with options.resume.
template <class TrialFn>
SweepResult run_sweep(const SweepOptions& options, Searcher& searcher, TrialFn&& trial) {
  if (options.budget < 1) rlhf::detail::fail("sweep: budget must be at least 1 trial, got {}", options.budget);
  if (options.stop_after < 0) rlhf::detail::fail("sweep: stop_after must be >= 0, got {}", options.stop_after);
  detail::open_sweep_folder(options);
  const auto results_path = options.out / "results.jsonl";
  SweepResult result{.path = options.out, .trials = {}, .best = std::nullopt, .completed = false};
  result.trials = options.resume ? detail::read_results(results_path, searcher.space()) : std::vector<Trial>{};
  std::string lines;
  for (const auto& t : result.trials) lines += detail::trial_line(t, detail::trial_dir_name(t.index)) + "\n";
  auto write_reports = [&] {
    result.best = best_trial(result.trials);
    write_file_atomic(options.out / "summary.md",
                      detail::summary_markdown(options, searcher, result.trials, result.completed));
    detail::plot_sweep(options.out / "plot.png", options, searcher, result.trials);
  };

  run::InterruptGuard interrupt;
  int64_t session = 0;
  bool stopped = false;
  while (static_cast<int64_t>(result.trials.size()) < options.budget) {
    if ((options.stop_after > 0 && session >= options.stop_after) || run::InterruptGuard::requested()) {
      stopped = true;
      break;
    }
    auto point = searcher.suggest(result.trials);
    if (!point) break;
    TrialContext context{
        .index = static_cast<int64_t>(result.trials.size()), .point = *point, .run_dir = {}, .resume = false};
    const auto relative = detail::trial_dir_name(context.index);
    context.run_dir = options.out / relative;
    context.resume = std::filesystem::exists(context.run_dir) && !std::filesystem::is_empty(context.run_dir);
    const auto start = std::chrono::steady_clock::now();
    TrialOutcome outcome;
    try {
      outcome = trial(static_cast<const TrialContext&>(context));
    } catch (const std::exception& e) {
      outcome = TrialOutcome{.error = e.what()};
    }
    if (outcome.interrupted) {
      stopped = true;
      break;
    }
    Trial t{.index = context.index,
            .point = std::move(context.point),
            .objective = outcome.objective,
            .status = "ok",
            .error = outcome.error,
            .metrics = outcome.metrics,
            .seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
    if (!std::isfinite(t.objective)) {
      t.status = "failed";
      t.objective = std::numeric_limits<double>::quiet_NaN();
      if (t.error.empty()) t.error = "the objective is not finite";
    }
    lines += detail::trial_line(t, relative) + "\n";
    write_file_atomic(results_path, lines);
    result.trials.push_back(std::move(t));
    ++session;
    write_reports();
    if (options.on_trial) options.on_trial(result.trials.back());
  }
  result.completed = !stopped;
  write_reports();
  return result;
}

}  // namespace rlhf::sweep
