#pragma once
/// @file Searchers of a sweep: grid, random and Bayesian optimisation (a Gaussian process with expected improvement,
/// gp.hpp). All share one interface, `suggest(history) -> point`, and are pure functions of their seed and the
/// history: the same finished trials give the same next point, which is what makes a resumed sweep run the same
/// trials as an uninterrupted one. Objectives are maximised; a failed trial (objective NaN: an error, a diverged run)
/// counts as a bad outcome and never stops the search.
///
///     rlhf::sweep::BayesianSearch search(space, {.seed = 3});
///     std::vector<rlhf::sweep::Trial> history;
///     while (auto point = search.suggest(history); point && history.size() < 30)
///       history.push_back({.index = (int64_t)history.size(), .point = *point, .objective = f(*point)});

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numbers>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <rlhf/detail/error.hpp>
#include <rlhf/sweep/gp.hpp>
#include <rlhf/sweep/space.hpp>

namespace rlhf::sweep {

/// One finished trial of a sweep (a line of results.jsonl).
struct Trial {
  int64_t index = 0;                                            ///< 0, 1, 2, ...
  Point point = Point::object();                                ///< the parameters it ran with
  double objective = std::numeric_limits<double>::quiet_NaN();  ///< higher is better; NaN when it failed
  std::string status = "ok";                                    ///< "ok" or "failed"
  std::string error;                                            ///< why it failed ("" when ok)
  nlohmann::json metrics = nlohmann::json::object();            ///< summary statistics (final reward, KL, ...)
  double seconds = 0.0;                                         ///< wall time of the trial

  /// Whether the trial finished with a finite objective.
  bool ok() const { return status == "ok" && std::isfinite(objective); }
};

/// Index of the trial with the highest finite objective (the first of equals), or nothing when none succeeded.
inline std::optional<size_t> best_trial(const std::vector<Trial>& trials) {
  std::optional<size_t> best;
  for (size_t i = 0; i < trials.size(); ++i)
    if (trials[i].ok() && (!best || trials[i].objective > trials[*best].objective)) best = i;
  return best;
}

namespace detail {

/// SplitMix64: a well-mixed 64-bit value from `x` (Steele et al. 2014), to derive per-trial seeds.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

/// A small deterministic generator (SplitMix64 stream) with the same numbers on every platform.
class Rng {
 public:
  /// The stream of (seed, stream): e.g. (the searcher's seed, the trial index).
  Rng(uint64_t seed, uint64_t stream) : state_(splitmix64(seed ^ splitmix64(stream + 0x51ed2705ULL))) {}
  /// The next 64 random bits.
  uint64_t next() { return splitmix64(state_ += 0x9e3779b97f4a7c15ULL); }
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Standard normal (Box-Muller).
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }
  /// Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }

 private:
  uint64_t state_;
};

/// A Latin hypercube of n points in [0, 1]^d: each axis cut into n equal strata, each stratum used once, the point
/// drawn uniformly inside its cell (McKay, Beckman & Conover 1979).
inline std::vector<std::vector<double>> latin_hypercube(size_t n, size_t d, uint64_t seed) {
  Rng rng(seed, 0x1a71'4c0bULL);
  std::vector<std::vector<double>> points(n, std::vector<double>(d));
  std::vector<size_t> perm(n);
  for (size_t j = 0; j < d; ++j) {
    for (size_t i = 0; i < n; ++i) perm[i] = i;
    for (size_t i = n; i > 1; --i) std::swap(perm[i - 1], perm[rng.below(i)]);  // Fisher-Yates
    for (size_t i = 0; i < n; ++i)
      points[i][j] = (static_cast<double>(perm[i]) + rng.uniform()) / static_cast<double>(n);
  }
  return points;
}

/// A uniform random point of [0, 1]^d.
inline std::vector<double> random_unit(Rng& rng, size_t d) {
  std::vector<double> u(d);
  for (auto& x : u) x = rng.uniform();
  return u;
}

}  // namespace detail

// ---- the interface ----

/// A search strategy over a space. suggest() returns the next point to try given the finished trials (in order),
/// or nothing when the strategy has no more points (a finished grid). Implementations are deterministic functions
/// of their options and the history, so a sweep can be resumed from its results alone.
class Searcher {
 public:
  /// The searcher over `space`.
  explicit Searcher(SearchSpace space) : space_(std::move(space)) {}
  virtual ~Searcher() = default;
  Searcher(const Searcher&) = default;
  Searcher& operator=(const Searcher&) = default;

  /// The next point to evaluate after `history`, or nothing when the searcher is exhausted.
  virtual std::optional<Point> suggest(const std::vector<Trial>& history) = 0;
  /// "grid", "random" or "bayes".
  virtual std::string name() const = 0;
  /// The space searched.
  const SearchSpace& space() const noexcept { return space_; }

 protected:
  SearchSpace space_;  ///< the space searched
};

// ---- grid ----

/// Every point of a grid with `points_per_axis` values per continuous axis (SearchSpace::grid()), in order; then
/// nothing.
class GridSearch : public Searcher {
 public:
  /// The grid over `space`, e.g. 3 points per axis: low, middle, high (log-middle for log-uniform axes).
  GridSearch(SearchSpace space, int64_t points_per_axis = 3)
      : Searcher(std::move(space)), grid_(space_.grid(points_per_axis)) {}

  std::optional<Point> suggest(const std::vector<Trial>& history) override {
    if (history.size() >= grid_.size()) return std::nullopt;
    return grid_[history.size()];
  }
  std::string name() const override { return "grid"; }
  /// Number of grid points.
  size_t size() const noexcept { return grid_.size(); }

 private:
  std::vector<Point> grid_;
};

// ---- random ----

/// Independent uniform draws in the unit cube (log-uniform axes are uniform in the log); trial i's point depends
/// only on (seed, i) (Bergstra & Bengio, "Random Search for Hyper-Parameter Optimization", JMLR 2012).
class RandomSearch : public Searcher {
 public:
  /// Random search over `space` with `seed`.
  RandomSearch(SearchSpace space, uint64_t seed = 0) : Searcher(std::move(space)), seed_(seed) {}

  std::optional<Point> suggest(const std::vector<Trial>& history) override {
    detail::Rng rng(seed_, history.size());
    return space_.from_unit(detail::random_unit(rng, space_.size()));
  }
  std::string name() const override { return "random"; }

 private:
  uint64_t seed_;
};

// ---- Bayesian optimisation ----

/// Options of BayesianSearch.
struct BayesOptions {
  uint64_t seed = 0;                ///< seeds the initial design and the candidate draws
  int64_t initial = 0;              ///< points of the seeded Latin-hypercube initial design; 0: max(4, 2 x dimensions)
  int64_t candidates = 2000;        ///< uniform random candidates per suggestion, e.g. 2000 (plus ones near the best)
  double xi = 0.01;                 ///< exploration margin of expected improvement, in standardised units, e.g. 0.01
  int64_t refine_evaluations = 60;  ///< Nelder-Mead steps polishing the best candidate's EI (0 = off)
  GPOptions gp;                     ///< the Gaussian process (hyperparameters fitted by default); its
                                    ///< length_scale_groups are set from the space (one length scale per parameter)
};

/// Bayesian optimisation (Snoek et al. 2012): a seeded Latin-hypercube initial design, then at each step a Gaussian
/// process (Matern 5/2, ARD, fitted by marginal likelihood) on the finished trials, and the candidate with the
/// highest expected improvement (Jones et al. 1998) among uniform random candidates and Gaussian perturbations of
/// the best trials (at three radii), polished by a few Nelder-Mead steps. Failed trials enter the GP with the worst
/// objective seen, so the search moves away from them; objectives below the median are log-compressed
/// (compress_low_tail) before the fit.
///
/// The GP's inputs are SearchSpace::features() (Garrido-Merchan & Hernandez-Lobato, "Dealing with categorical and
/// integer-valued variables in Bayesian optimization with Gaussian processes", Neurocomputing 380, 2020): a numeric
/// parameter is its unit coordinate (snapped to its value for an integer one), a categorical parameter with n choices
/// is n one-hot coordinates, so that any two different choices are equally far apart whatever their order. Candidates
/// are drawn and perturbed in the unit cube, then snapped to valid points before their features are computed, so
/// expected improvement is evaluated only where a trial can run. The features of one parameter share one length
/// scale (GPOptions::length_scale_groups): for a categorical parameter the kernel between two different choices is
/// then the same for every pair (the model does not depend on the order of the choices), and the fit has one
/// hyperparameter per parameter however many choices there are.
class BayesianSearch : public Searcher {
 public:
  /// Bayesian optimisation over `space`.
  BayesianSearch(SearchSpace space, BayesOptions options = {})
      : Searcher(std::move(space)), options_(std::move(options)) {
    if (options_.initial < 0 || options_.candidates < 1)
      rlhf::detail::fail("sweep: bayes: initial must be >= 0 and candidates >= 1, got {} and {}", options_.initial,
                         options_.candidates);
    options_.gp.length_scale_groups = space_.feature_params();
  }

  std::optional<Point> suggest(const std::vector<Trial>& history) override {
    const size_t n = history.size(), d = space_.size(), features = space_.feature_size();
    const size_t initial = initial_points();
    if (n < initial) return space_.from_unit(detail::latin_hypercube(initial, d, options_.seed)[n]);

    // Observations: failed trials count as the worst objective seen.
    double worst = std::numeric_limits<double>::infinity();
    for (const auto& t : history)
      if (t.ok()) worst = std::min(worst, t.objective);
    detail::Rng rng(options_.seed, n);
    if (!std::isfinite(worst)) return space_.from_unit(detail::random_unit(rng, d));  // nothing succeeded yet
    // X: the trials' GP features; U: their unit coordinates (where candidates are perturbed).
    Eigen::MatrixXd X(static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(features));
    std::vector<std::vector<double>> U(n);
    Eigen::VectorXd y(static_cast<Eigen::Index>(n));
    for (size_t i = 0; i < n; ++i) {
      U[i] = space_.to_unit(history[i].point);
      const auto f = space_.features(history[i].point);
      for (size_t j = 0; j < features; ++j) X(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) = f[j];
      y(static_cast<Eigen::Index>(i)) = history[i].ok() ? history[i].objective : worst;
    }
    y = compress_low_tail(y);
    gp_ = GaussianProcess(options_.gp);
    gp_.fit(X, y);
    const double best = y.maxCoeff();
    const double scale = std::sqrt(std::max(variance(y), 1e-24));
    const double xi = options_.xi * scale;

    // Candidates in the unit cube: uniform draws, and perturbations of the best few trials at three radii.
    std::vector<std::vector<double>> candidates;
    for (int64_t i = 0; i < options_.candidates; ++i) candidates.push_back(detail::random_unit(rng, d));
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return y(static_cast<Eigen::Index>(a)) > y(static_cast<Eigen::Index>(b));
    });
    for (size_t k = 0; k < std::min<size_t>(3, n); ++k) {
      for (const double radius : {0.005, 0.02, 0.1}) {
        for (int i = 0; i < 50; ++i) {
          std::vector<double> u(d);
          for (size_t j = 0; j < d; ++j) u[j] = std::clamp(U[order[k]][j] + radius * rng.normal(), 0.0, 1.0);
          candidates.push_back(std::move(u));
        }
      }
    }
    for (auto& u : candidates) u = space_.snap(u);

    // The candidate of highest expected improvement that is not a finished trial's point, judged on the features
    // of the (snapped) unit points.
    auto ei_of = [&](const std::vector<std::vector<double>>& points) {
      Eigen::MatrixXd C(static_cast<Eigen::Index>(points.size()), static_cast<Eigen::Index>(features));
      for (size_t i = 0; i < points.size(); ++i) {
        const auto f = space_.unit_features(points[i]);
        for (size_t j = 0; j < features; ++j) C(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) = f[j];
      }
      const auto p = gp_.predict(C);
      std::vector<double> ei(points.size());
      for (size_t i = 0; i < points.size(); ++i) {
        const auto k = static_cast<Eigen::Index>(i);
        ei[i] = seen(X, C.row(k)) ? -1.0 : expected_improvement(p.mean(k), p.variance(k), best, xi);
      }
      return ei;
    };
    const auto ei = ei_of(candidates);
    const auto chosen = static_cast<size_t>(std::max_element(ei.begin(), ei.end()) - ei.begin());
    std::vector<double> u = candidates[chosen];
    double u_ei = ei[chosen];
    if (options_.refine_evaluations > 0) {
      Eigen::VectorXd x0 = Eigen::Map<const Eigen::VectorXd>(u.data(), static_cast<Eigen::Index>(d));
      auto negative_ei = [&](const Eigen::VectorXd& x) {
        std::vector<double> v(x.data(), x.data() + x.size());
        for (auto& c : v) c = std::clamp(c, 0.0, 1.0);
        return -ei_of({space_.snap(v)})[0];
      };
      const Eigen::VectorXd x = detail::nelder_mead(negative_ei, x0, 0.02, options_.refine_evaluations);
      std::vector<double> v(x.data(), x.data() + x.size());
      for (auto& c : v) c = std::clamp(c, 0.0, 1.0);
      v = space_.snap(v);
      const double v_ei = ei_of({v})[0];
      if (v_ei > u_ei) {
        u = std::move(v);
        u_ei = v_ei;
      }
    }
    if (u_ei < 0) u = space_.snap(detail::random_unit(rng, d));  // every candidate was already tried
    return space_.from_unit(u);
  }

  std::string name() const override { return "bayes"; }

  /// The size of the initial design.
  size_t initial_points() const {
    return options_.initial > 0 ? static_cast<size_t>(options_.initial) : std::max<size_t>(4, 2 * space_.size());
  }
  /// The Gaussian process of the last suggestion (fitted once the initial design is done), on
  /// SearchSpace::features() with one length scale per parameter.
  const GaussianProcess& gp() const noexcept { return gp_; }
  /// The options.
  const BayesOptions& options() const noexcept { return options_; }

 private:
  /// Objectives below the median, compressed: y -> m - s log(1 + (m - y) / s), with m the median and s the median
  /// absolute deviation (or 1 when it is 0). A monotone map, so the best trial stays the best; one disastrous trial
  /// (a diverged run scored -40 among scores near 0) no longer flattens the standardised outputs of all the others.
  static Eigen::VectorXd compress_low_tail(Eigen::VectorXd y) {
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      const size_t n = v.size();
      return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
    };
    const double m = median(std::vector<double>(y.data(), y.data() + y.size()));
    std::vector<double> deviations(static_cast<size_t>(y.size()));
    for (Eigen::Index i = 0; i < y.size(); ++i) deviations[static_cast<size_t>(i)] = std::abs(y(i) - m);
    double s = median(deviations);
    if (!(s > 0)) s = 1.0;
    for (Eigen::Index i = 0; i < y.size(); ++i)
      if (y(i) < m) y(i) = m - s * std::log1p((m - y(i)) / s);
    return y;
  }
  static double variance(const Eigen::VectorXd& y) {
    return y.size() > 1 ? (y.array() - y.mean()).square().sum() / static_cast<double>(y.size()) : 0.0;
  }
  /// Whether the features `f` are (within 1e-9) those of a row of X.
  static bool seen(const Eigen::MatrixXd& X, const Eigen::RowVectorXd& f) {
    for (Eigen::Index i = 0; i < X.rows(); ++i)
      if ((X.row(i) - f).cwiseAbs().maxCoeff() < 1e-9) return true;
    return false;
  }

  BayesOptions options_;
  GaussianProcess gp_;
};

}  // namespace rlhf::sweep
