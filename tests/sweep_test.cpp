#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#include <rlhf/rlhf.hpp>
#include <rlhf/sweep/gp.hpp>
#include <rlhf/sweep/objective.hpp>
#include <rlhf/sweep/ppo_sweep.hpp>
#include <rlhf/sweep/search.hpp>
#include <rlhf/sweep/space.hpp>
#include <rlhf/sweep/sweep.hpp>

namespace sw = rlhf::sweep;
using nlohmann::json;

namespace {

/// Branin-Hoo on [-5, 10] x [0, 15]; global minimum 0.397887 at (-pi, 12.275), (pi, 2.275), (9.42478, 2.475).
double branin(double x, double y) {
  const double pi = std::numbers::pi;
  const double b = 5.1 / (4 * pi * pi), c = 5 / pi, t = 1 / (8 * pi);
  return std::pow(y - b * x * x + c * x - 6, 2) + 10 * (1 - t) * std::cos(x) + 10;
}

constexpr double kBraninMin = 0.397887;

/// Runs a searcher on -branin for `budget` evaluations; returns (evaluations until f < threshold, or budget + 1;
/// best f found).
std::pair<int, double> run_branin(sw::Searcher& searcher, int budget, double threshold) {
  std::vector<sw::Trial> history;
  int hit = budget + 1;
  double best = INFINITY;
  for (int i = 0; i < budget; ++i) {
    auto p = searcher.suggest(history);
    REQUIRE(p.has_value());
    const double f = branin((*p)["x"].get<double>(), (*p)["y"].get<double>());
    best = std::min(best, f);
    if (f < threshold && hit > budget) hit = i + 1;
    history.push_back({.index = i, .point = *p, .objective = -f});
  }
  return {hit, best};
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

/// results.jsonl without the wall times (which differ between runs).
std::vector<json> results_without_time(const std::filesystem::path& path) {
  std::vector<json> out;
  std::istringstream lines(read_text(path));
  for (std::string line; std::getline(lines, line);) {
    auto j = json::parse(line);
    j.erase("seconds");
    out.push_back(j);
  }
  return out;
}

}  // namespace

// ---- search spaces ----

TEST_CASE("sweep space: unit-cube mapping, grids and parsing") {
  sw::SearchSpace space(
      {sw::Param::uniform("ppo.clip_coef", 0.1, 0.3), sw::Param::log_uniform("ppo.base_lr", 1e-4, 1e-2),
       sw::Param::integer("lora.rank", 2, 32, true), sw::Param::categorical("ppo.kl_estimator", {"k1", "k3"})});

  SUBCASE("from_unit and to_unit") {
    auto p = space.from_unit({0.5, 0.5, 0.0, 0.9});
    CHECK(p["ppo.clip_coef"].get<double>() == doctest::Approx(0.2));
    CHECK(p["ppo.base_lr"].get<double>() == doctest::Approx(1e-3));  // the geometric middle
    CHECK(p["lora.rank"] == 2);
    CHECK(p["lora.rank"].is_number_integer());
    CHECK(p["ppo.kl_estimator"] == "k3");
    auto u = space.to_unit(p);
    CHECK(u[0] == doctest::Approx(0.5));
    CHECK(u[1] == doctest::Approx(0.5));
    CHECK(u[2] == doctest::Approx(0.0));
    CHECK(u[3] == doctest::Approx(0.75));  // the middle of the second choice's interval
    CHECK(space.from_unit({0, 0, 1, 0})["lora.rank"] == 32);
    CHECK(space.from_unit({0, 0, 0.5, 0})["lora.rank"] == 8);  // sqrt(2 * 32)
  }

  SUBCASE("grid") {
    auto grid = space.grid(3);
    CHECK(grid.size() == 3 * 3 * 3 * 2);
    CHECK(grid.front() ==
          json{{"ppo.clip_coef", 0.1}, {"ppo.base_lr", 1e-4}, {"lora.rank", 2}, {"ppo.kl_estimator", "k1"}});
    std::vector<json> ranks = sw::Param::integer("r", 1, 3).grid(5);
    CHECK(ranks == std::vector<json>{1, 2, 3});  // every integer when there are few
  }

  SUBCASE("errors") {
    CHECK_THROWS_WITH_AS(
        space.to_unit(
            json{{"ppo.clip_coef", 0.5}, {"ppo.base_lr", 1e-3}, {"lora.rank", 4}, {"ppo.kl_estimator", "k1"}}),
        "sweep: parameter 'ppo.clip_coef': 0.5 is outside [0.1, 0.3]", rlhf::Error);
    CHECK_THROWS_WITH_AS(sw::SearchSpace({sw::Param::log_uniform("a", 0.0, 1.0)}),
                         "sweep: parameter 'a': a log_uniform range needs low > 0, got 0", rlhf::Error);
    CHECK_THROWS_WITH_AS(sw::SearchSpace({sw::Param::uniform("a", 0, 1), sw::Param::uniform("a", 0, 2)}),
                         "sweep: parameter 'a' appears twice in the search space", rlhf::Error);
  }

  SUBCASE("from_json, strict") {
    auto parsed = sw::SearchSpace::from_json(space.to_json(), "s.toml");
    CHECK(parsed.to_json() == space.to_json());
    json bad = json::array({{{"name", "ppo.kl_coef"}, {"kind", "log_uniform"}, {"low", 0.01}, {"hihg", 1.0}}});
    CHECK_THROWS_WITH_AS(sw::SearchSpace::from_json(bad, "s.toml"),
                         "s.toml: unknown key 'space[0].hihg' ---> HINT: did you mean 'space[0].high'?", rlhf::Error);
    bad = json::array({{{"name", "x"}, {"kind", "logunif"}, {"low", 0.01}, {"high", 1.0}}});
    CHECK_THROWS_WITH_AS(sw::SearchSpace::from_json(bad, "s.toml"),
                         "s.toml: key 'space[0].kind': 'logunif' is not one of uniform, log_uniform, integer, "
                         "categorical",
                         rlhf::Error);
    bad = json::array({{{"name", "x"}, {"kind", "uniform"}, {"low", 2.0}, {"high", 1.0}}});
    CHECK_THROWS_WITH_AS(sw::SearchSpace::from_json(bad, "s.toml"),
                         "s.toml: key 'space[0]': parameter 'x': expected finite bounds with low <= high, got [2, 1]",
                         rlhf::Error);
  }

  SUBCASE("apply_point") {
    auto config = sw::apply_point(json{{"ppo", {{"seed", 3}}}}, json{{"ppo.base_lr", 1e-3}, {"lora.alpha", 16}});
    CHECK(config == json{{"ppo", {{"seed", 3}, {"base_lr", 1e-3}}}, {"lora", {{"alpha", 16}}}});
  }
}

TEST_CASE("sweep space: Gaussian-process features are unit coordinates and one-hot choices") {
  sw::SearchSpace space({sw::Param::uniform("x", 0, 10), sw::Param::categorical("c", {"k1", "k3", "abs"})});
  CHECK(space.size() == 2);
  CHECK(space.feature_size() == 4);
  CHECK(space.feature_params() == std::vector<int64_t>{0, 1, 1, 1});
  CHECK(space.features(json{{"x", 2.5}, {"c", "k3"}}) == std::vector<double>{0.25, 0, 1, 0});
  CHECK(space.features(json{{"x", 10.0}, {"c", "k1"}}) == std::vector<double>{1, 1, 0, 0});
  // From unit coordinates: the categorical coordinate snaps to its choice first (0.9 of 3 choices: the third).
  CHECK(space.unit_features({0.25, 0.9}) == std::vector<double>{0.25, 0, 0, 1});
  CHECK(space.unit_features({0.0, 0.34}) == std::vector<double>{0, 0, 1, 0});
  // Integers: the unit coordinate of the value, i.e. snapped (0.3 of [1, 5] is 2.2 -> 2 -> 0.25).
  sw::SearchSpace with_integer({sw::Param::integer("r", 1, 5), sw::Param::categorical("b", {true, false})});
  CHECK(with_integer.feature_size() == 3);
  CHECK(with_integer.unit_features({0.3, 0.2}) == std::vector<double>{0.25, 1, 0});
  CHECK(with_integer.features(json{{"r", 5}, {"b", false}}) == std::vector<double>{1, 0, 1});

  CHECK_THROWS_WITH_AS(space.features(json{{"x", 2.5}, {"c", "k2"}}),
                       R"(sweep: parameter 'c': "k2" is not one of the choices ["k1","k3","abs"])", rlhf::Error);
  CHECK_THROWS_WITH_AS(space.features(json{{"x", 2.5}}), R"(sweep: point {"x":2.5}: parameter 'c' is missing)",
                       rlhf::Error);
}

// ---- Gaussian process ----

TEST_CASE("GP posterior mean and variance match an independent computation") {
  // Expected values from numpy (/usr/bin/python3, numpy 1.24), with an explicit inverse instead of a Cholesky solve:
  //   X = [[0.1, 0.2], [0.4, 0.9], [0.7, 0.3], [0.95, 0.6]];  y = [1.0, -0.5, 2.0, 0.3]
  //   Xs = [[0.5, 0.5], [0.1, 0.25], [0.9, 0.9]];  l = [0.3, 0.5];  s2 = 1.5;  noise = 0.01
  //   r = sqrt(sum(((A[:, None] - B[None]) / l)**2, -1));  k = s2 * (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r)
  //   K = k(X, X) + noise I;  Kinv = inv(K);  Ks = k(X, Xs)
  //   mean = Ks.T @ Kinv @ y;  var = s2 - diag(Ks.T @ Kinv @ Ks)
  //   lml = -y @ Kinv @ y / 2 - log(det(K)) / 2 - 4/2 log(2 pi)
  //   standardised: m = y.mean(), s = y.std() (population); mean = Ks.T Kinv (y - m) / s * s + m; var * s^2
  Eigen::MatrixXd X(4, 2), Xs(3, 2);
  X << 0.1, 0.2, 0.4, 0.9, 0.7, 0.3, 0.95, 0.6;
  Xs << 0.5, 0.5, 0.1, 0.25, 0.9, 0.9;
  Eigen::VectorXd y(4);
  y << 1.0, -0.5, 2.0, 0.3;
  sw::GPHyperparameters h;
  h.length_scales = Eigen::Vector2d(0.3, 0.5);
  h.signal_variance = 1.5;
  h.noise_variance = 0.01;

  SUBCASE("raw outputs") {
    sw::GaussianProcess gp({.standardize = false, .fit_hyperparameters = false, .initial = h});
    gp.fit(X, y);
    auto p = gp.predict(Xs);
    const double mean[] = {1.013690119732, 0.958375457044, -0.028029733729};
    const double var[] = {0.521450692574, 0.033144722553, 0.622660258242};
    for (int i = 0; i < 3; ++i) {
      CHECK(p.mean(i) == doctest::Approx(mean[i]).epsilon(1e-9));
      CHECK(p.variance(i) == doctest::Approx(var[i]).epsilon(1e-9));
    }
    CHECK(gp.log_marginal_likelihood() == doctest::Approx(-6.4606731660152).epsilon(1e-10));
  }

  SUBCASE("standardised outputs") {
    sw::GaussianProcess gp({.standardize = true, .fit_hyperparameters = false, .initial = h});
    gp.fit(X, y);
    auto p = gp.predict(Xs);
    const double mean[] = {0.976343997123, 0.954613871999, 0.108867294844};
    const double var[] = {0.440625835225, 0.028007290557, 0.526147918214};
    for (int i = 0; i < 3; ++i) {
      CHECK(p.mean(i) == doctest::Approx(mean[i]).epsilon(1e-9));
      CHECK(p.variance(i) == doctest::Approx(var[i]).epsilon(1e-9));
    }
  }

  SUBCASE("fitted hyperparameters raise the likelihood, deterministically") {
    sw::GaussianProcess fixed({.fit_hyperparameters = false, .initial = h});
    fixed.fit(X, y);
    sw::GaussianProcess a, b;
    a.fit(X, y);
    b.fit(X, y);
    CHECK(a.log_marginal_likelihood() >= fixed.log_marginal_likelihood());
    CHECK(a.hyperparameters().length_scales == b.hyperparameters().length_scales);
    CHECK(a.hyperparameters().noise_variance == b.hyperparameters().noise_variance);
    // Nearly noise-free data of a smooth function: the fitted process interpolates it.
    Eigen::MatrixXd grid(9, 1);
    Eigen::VectorXd f(9);
    for (int i = 0; i < 9; ++i) {
      grid(i, 0) = i / 8.0;
      f(i) = std::sin(6 * grid(i, 0));
    }
    sw::GaussianProcess smooth;
    smooth.fit(grid, f);
    Eigen::MatrixXd mid(1, 1);
    mid << 0.5625;
    auto p = smooth.predict(mid);
    CHECK(p.mean(0) == doctest::Approx(std::sin(6 * 0.5625)).epsilon(0.02));
    CHECK(p.variance(0) < 0.01);
  }

  SUBCASE("expected improvement") {
    // EI at z = 0: sigma * phi(0); with no variance: the plain improvement; far below the best: ~0.
    CHECK(sw::expected_improvement(1.0, 4.0, 1.0) == doctest::Approx(2.0 / std::sqrt(2 * std::numbers::pi)));
    CHECK(sw::expected_improvement(3.0, 0.0, 1.0) == doctest::Approx(2.0));
    CHECK(sw::expected_improvement(0.0, 0.0, 1.0) == 0.0);
    CHECK(sw::expected_improvement(-10.0, 1.0, 1.0) < 1e-20);
    // (mu - best) Phi(z) + sigma phi(z) for mu = 1.5, sigma = 0.5, best = 1 (z = 1): 0.5 * 0.841345 + 0.5 * 0.241971
    CHECK(sw::expected_improvement(1.5, 0.25, 1.0) == doctest::Approx(0.5 * 0.8413447461 + 0.5 * 0.2419707245));
  }
}

TEST_CASE("GP with shared length scales: every two different categorical choices are equally correlated") {
  // Features of x uniform in [0, 1] and c in {k1, k3, abs}; x and c's three one-hot columns have a length scale each.
  sw::SearchSpace space({sw::Param::uniform("x", 0, 1), sw::Param::categorical("c", {"k1", "k3", "abs"})});
  const std::vector<json> choices = space.params()[1].choices;
  Eigen::MatrixXd X(3, 4);
  Eigen::VectorXd y(3);
  for (int i = 0; i < 3; ++i) {
    const auto f = space.features(json{{"x", 0.2 * i}, {"c", choices[static_cast<size_t>(i)]}});
    X.row(i) = Eigen::Map<const Eigen::RowVectorXd>(f.data(), 4);
    y(i) = i;
  }
  sw::GPHyperparameters h;
  h.length_scales = Eigen::Vector2d(0.5, 0.8);
  h.signal_variance = 1.5;
  sw::GaussianProcess gp({.fit_hyperparameters = false, .initial = h, .length_scale_groups = space.feature_params()});
  gp.fit(X, y);
  CHECK(gp.hyperparameters().length_scales.size() == 2);
  Eigen::MatrixXd F(3, 4);
  for (int i = 0; i < 3; ++i) {
    const auto f = space.features(json{{"x", 0.4}, {"c", choices[static_cast<size_t>(i)]}});
    F.row(i) = Eigen::Map<const Eigen::RowVectorXd>(f.data(), 4);
  }
  const Eigen::MatrixXd K = gp.kernel(F, F);
  // Two different choices differ in two one-hot coordinates: r = sqrt(2) / 0.8 for every pair.
  const double between = 1.5 * sw::matern52(std::sqrt(2.0) / 0.8);
  for (int i = 0; i < 3; ++i) {
    CHECK(K(i, i) == doctest::Approx(1.5));
    for (int j = 0; j < 3; ++j)
      if (i != j) CHECK(K(i, j) == doctest::Approx(between).epsilon(1e-12));
  }

  sw::GPOptions wrong;
  wrong.length_scale_groups = {0, 1};
  CHECK_THROWS_WITH_AS(sw::GaussianProcess(wrong).fit(X, y),
                       "gp: length_scale_groups has 2 entries, expected one per input column (4)", rlhf::Error);
  wrong.length_scale_groups = {0, 2, 2, 2};
  CHECK_THROWS_WITH_AS(sw::GaussianProcess(wrong).fit(X, y),
                       "gp: length_scale_groups: expected the groups 0 to 2 each used, group 1 has no column",
                       rlhf::Error);
}

// ---- searchers ----

TEST_CASE("search: Bayesian optimisation finds the Branin optimum in fewer evaluations than random search") {
  sw::SearchSpace space({sw::Param::uniform("x", -5, 10), sw::Param::uniform("y", 0, 15)});
  constexpr int kBudget = 35;
  constexpr double kThreshold = 0.5;  // within 0.1 of the optimum 0.3979
  double bo_hits = 0, random_hits = 0, bo_best = 0, random_best = 0;
  constexpr int kSeeds = 5;
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    sw::BayesianSearch bo(space, {.seed = seed, .candidates = 1000});
    sw::RandomSearch random(space, seed);
    const auto [bh, bb] = run_branin(bo, kBudget, kThreshold);
    const auto [rh, rb] = run_branin(random, kBudget, kThreshold);
    MESSAGE("seed " << seed << ": bayes reaches f < 0.5 after " << bh << " evaluations (best " << bb
                    << "), random after " << rh << " (best " << rb << ")");
    bo_hits += bh;
    random_hits += rh;
    bo_best += bb;
    random_best += rb;
  }
  bo_hits /= kSeeds;
  random_hits /= kSeeds;
  CHECK(bo_hits < random_hits);
  CHECK(bo_hits <= kBudget);                   // on average inside the budget
  CHECK(bo_best / kSeeds - kBraninMin < 0.1);  // mean regret after 35 evaluations
  CHECK(bo_best < random_best);
}

TEST_CASE("search: searchers are deterministic, grids end, failed trials do not stop the search") {
  sw::SearchSpace space({sw::Param::uniform("x", 0, 1), sw::Param::categorical("c", {"a", "b", "c"})});

  SUBCASE("random: the same seed gives the same points, trial by trial") {
    sw::RandomSearch a(space, 7), b(space, 7), c(space, 8);
    std::vector<sw::Trial> history;
    for (int i = 0; i < 5; ++i) {
      auto p = *a.suggest(history);
      CHECK(p == *b.suggest(history));
      CHECK(p != *c.suggest(history));
      history.push_back({.index = i, .point = p, .objective = 0});
    }
  }

  SUBCASE("grid") {
    sw::GridSearch grid(space, 2);
    CHECK(grid.size() == 6);
    std::vector<sw::Trial> history;
    while (auto p = grid.suggest(history)) history.push_back({.index = (int64_t)history.size(), .point = *p});
    CHECK(history.size() == 6);
    CHECK(history[1].point == json{{"x", 0.0}, {"c", "b"}});
  }

  SUBCASE("bayes with failures") {
    sw::BayesianSearch a(space, {.seed = 3, .initial = 4}), b(space, {.seed = 3, .initial = 4});
    std::vector<sw::Trial> history;
    for (int i = 0; i < 10; ++i) {
      auto p = *a.suggest(history);
      CHECK(p == *b.suggest(history));
      const double x = p["x"].get<double>();
      sw::Trial t{.index = i, .point = p, .objective = -std::pow(x - 0.7, 2) + (p["c"] == "b" ? 0.5 : 0.0)};
      if (x < 0.3) t = {.index = i, .point = p, .status = "failed", .error = "diverged"};  // NaN objective
      history.push_back(t);
    }
    const auto best = sw::best_trial(history);
    REQUIRE(best);
    CHECK(history[*best].point["c"] == "b");
    CHECK(history[*best].point["x"].get<double>() == doctest::Approx(0.7).epsilon(0.15));
  }

  SUBCASE("make_searcher") {
    CHECK(sw::make_searcher({.kind = sw::SearcherKind::grid}, space)->name() == "grid");
    CHECK(sw::make_searcher({.kind = sw::SearcherKind::random}, space)->name() == "random");
    CHECK(sw::make_searcher({}, space)->name() == "bayes");
  }
}

TEST_CASE("search: Bayesian optimisation does not depend on the order of categorical choices") {
  // The same finished trials, with the choices listed in two orders: the fitted GP (hyperparameters, posterior mean
  // and variance at every choice) is the same. With the choices on one ordered axis, it would not be.
  const std::vector<json> listed = {"k1", "k3", "abs"}, reordered = {"abs", "k1", "k3"};
  sw::SearchSpace a({sw::Param::uniform("x", 0, 1), sw::Param::categorical("c", listed)});
  sw::SearchSpace b({sw::Param::uniform("x", 0, 1), sw::Param::categorical("c", reordered)});
  const double xs[] = {0.1, 0.35, 0.6, 0.85, 0.2, 0.7, 0.5};
  const char* cs[] = {"k1", "abs", "k3", "k1", "k3", "abs", "k1"};
  std::vector<sw::Trial> history;
  for (int i = 0; i < 7; ++i) {
    const double offset = cs[i] == std::string("k1") ? 0.2 : cs[i] == std::string("k3") ? 0.0 : 0.3;
    history.push_back({.index = i,
                       .point = json{{"x", xs[i]}, {"c", cs[i]}},
                       .objective = -std::pow(xs[i] - 0.3, 2) - offset + 0.05 * std::sin(9 * xs[i])});
  }
  sw::BayesianSearch sa(a, {.initial = 4}), sb(b, {.initial = 4});
  REQUIRE(sa.suggest(history));
  REQUIRE(sb.suggest(history));
  const auto& ha = sa.gp().hyperparameters();
  const auto& hb = sb.gp().hyperparameters();
  REQUIRE(ha.length_scales.size() == 2);  // one per parameter
  REQUIRE(hb.length_scales.size() == 2);
  for (int k = 0; k < 2; ++k) CHECK(ha.length_scales(k) == doctest::Approx(hb.length_scales(k)).epsilon(1e-9));
  CHECK(ha.signal_variance == doctest::Approx(hb.signal_variance).epsilon(1e-9));
  CHECK(ha.noise_variance == doctest::Approx(hb.noise_variance).epsilon(1e-9));
  for (const double x : {0.0, 0.3, 0.55, 1.0}) {
    for (const auto& c : listed) {
      CAPTURE(x);
      CAPTURE(c);
      const json point = {{"x", x}, {"c", c}};
      const auto fa = a.features(point), fb = b.features(point);
      const auto pa = sa.gp().predict(Eigen::Map<const Eigen::RowVectorXd>(fa.data(), 4));
      const auto pb = sb.gp().predict(Eigen::Map<const Eigen::RowVectorXd>(fb.data(), 4));
      CHECK(pa.mean(0) == doctest::Approx(pb.mean(0)).epsilon(1e-9));
      CHECK(pa.variance(0) == doctest::Approx(pb.variance(0)).epsilon(1e-9));
    }
  }
  // The kernel between (x, choice i) and (x, choice j) is one value for every i != j.
  Eigen::MatrixXd F(3, 4);
  for (int i = 0; i < 3; ++i) {
    const auto f = a.features(json{{"x", 0.4}, {"c", listed[static_cast<size_t>(i)]}});
    F.row(i) = Eigen::Map<const Eigen::RowVectorXd>(f.data(), 4);
  }
  const Eigen::MatrixXd K = sa.gp().kernel(F, F);
  CHECK(K(0, 1) == doctest::Approx(K(0, 2)).epsilon(1e-12));
  CHECK(K(1, 2) == doctest::Approx(K(0, 2)).epsilon(1e-12));
  CHECK(K(0, 1) < K(0, 0));
}

TEST_CASE("search: Bayesian optimisation finds the best categorical choice in the middle of the list") {
  // f(x, c) = (x - 0.3)^2 + {0.5, 0, 0.7}[c], minimised: the middle choice at x = 0.3.
  sw::SearchSpace space({sw::Param::uniform("x", 0, 1), sw::Param::categorical("c", {"k1", "k3", "abs"})});
  const double offset[] = {0.5, 0.0, 0.7};
  constexpr int kBudget = 12;
  for (uint64_t seed = 0; seed < 5; ++seed) {
    CAPTURE(seed);
    sw::BayesianSearch search(space, {.seed = seed});
    std::vector<sw::Trial> history;
    for (int i = 0; i < kBudget; ++i) {
      auto p = search.suggest(history);
      REQUIRE(p.has_value());
      const double x = (*p)["x"].get<double>();
      const double f = std::pow(x - 0.3, 2) + offset[space.params()[1].choice_index((*p)["c"])];
      history.push_back({.index = i, .point = *p, .objective = -f});
    }
    const auto best = sw::best_trial(history);
    REQUIRE(best);
    MESSAGE("seed " << seed << ": best " << history[*best].point.dump() << " after " << *best + 1 << " of " << kBudget
                    << " evaluations");
    CHECK(history[*best].point["c"] == "k3");
    CHECK(std::abs(history[*best].point["x"].get<double>() - 0.3) < 0.05);
  }
}

// ---- objective ----

TEST_CASE("sweep objective: reward minus KL penalty over the last phases; failures") {
  std::vector<json> records;
  for (int step = 1; step <= 10; ++step)
    records.push_back({{"step", step}, {"reward_mean", step * 0.1}, {"kl", step * 0.5}});
  auto v = sw::evaluate_objective({}, records);  // defaults: last 5, beta 1, budget 0
  CHECK(v.ok());
  CHECK(v.metric == doctest::Approx(0.8));  // mean of 0.6 .. 1.0
  CHECK(v.kl == doctest::Approx(4.0));      // mean of 3.0 .. 5.0
  CHECK(v.value == doctest::Approx(0.8 - 4.0));
  v = sw::evaluate_objective({.last = 2, .kl_penalty = 0.5, .kl_budget = 4.0}, records);
  CHECK(v.value == doctest::Approx(0.95 - 0.5 * 0.75));
  v = sw::evaluate_objective({.kl_budget = 10}, records);
  CHECK(v.value == doctest::Approx(0.8));

  records[8]["reward_mean"] = nullptr;  // NaN is logged as null
  v = sw::evaluate_objective({}, records);
  CHECK_FALSE(v.ok());
  CHECK(v.failure == "diverged: 'reward_mean' is NaN at step 9");
  CHECK(sw::evaluate_objective({.metric = "gold_mean"}, records).failure == "no logged records hold 'gold_mean'");
}

// ---- the runner ----

TEST_CASE("sweep runner: an interrupted and resumed sweep runs the same trials as an uninterrupted one") {
  rlhf::test::TempDir dir;
  sw::SearchSpace space(
      {sw::Param::log_uniform("lr", 1e-4, 1e-1), sw::Param::uniform("kl", 0, 1), sw::Param::integer("rank", 1, 8)});
  // A cheap trial: a smooth function of the point, failing (throwing or NaN) in two corners.
  std::vector<bool> resumed_flags;
  auto trial = [&](const sw::TrialContext& t) -> sw::TrialOutcome {
    resumed_flags.push_back(t.resume);
    std::filesystem::create_directories(t.run_dir);
    const double lr = t.point["lr"].get<double>(), kl = t.point["kl"].get<double>();
    const auto rank = t.point["rank"].get<int64_t>();
    if (lr > 0.05) throw rlhf::Error("loss is NaN");
    if (kl > 0.95) return {.error = "diverged"};
    const double f = -std::pow(std::log10(lr) + 2.5, 2) - std::pow(kl - 0.3, 2) - 0.01 * std::abs(rank - 4);
    return {.objective = f, .metrics = {{"f", f}}};
  };
  for (auto kind : {sw::SearcherKind::bayes, sw::SearcherKind::random}) {
    CAPTURE(static_cast<int>(kind));
    const auto name = kind == sw::SearcherKind::bayes ? std::string("bayes") : std::string("random");
    sw::SearcherConfig sc{.kind = kind, .seed = 11, .initial = 4, .candidates = 300};
    json config = {{"searcher", name}, {"budget", 9}};
    auto whole_searcher = sw::make_searcher(sc, space);
    auto whole = sw::run_sweep({.out = dir / (name + "-whole"), .budget = 9, .config = config}, *whole_searcher, trial);
    CHECK(whole.completed);
    CHECK(whole.trials.size() == 9);

    // Session 1: 3 trials, then stop. Session 2: 2 trials, then Ctrl-C inside the next one. Session 3: the rest.
    const auto out = dir / (name + "-split");
    auto s1 = sw::make_searcher(sc, space);
    auto first = sw::run_sweep({.out = out, .budget = 9, .stop_after = 3, .config = config}, *s1, trial);
    CHECK_FALSE(first.completed);
    CHECK(first.trials.size() == 3);
    CHECK_THROWS_WITH_AS(sw::run_sweep({.out = out, .budget = 9, .config = config}, *s1, trial),
                         doctest::Contains("the folder already holds a sweep"), rlhf::Error);
    int64_t in_session = 0;
    auto interrupting = [&](const sw::TrialContext& t) -> sw::TrialOutcome {
      if (++in_session == 3) {
        std::filesystem::create_directories(t.run_dir);  // part of a run, as a Ctrl-C inside PPO leaves it
        std::ofstream(t.run_dir / "config.json") << "{}\n";
        return {.interrupted = true};
      }
      return trial(t);
    };
    auto s2 = sw::make_searcher(sc, space);
    auto second = sw::run_sweep({.out = out, .budget = 9, .resume = true, .config = config}, *s2, interrupting);
    CHECK_FALSE(second.completed);
    CHECK(second.trials.size() == 5);
    resumed_flags.clear();
    auto s3 = sw::make_searcher(sc, space);
    config["budget"] = 9;
    auto third = sw::run_sweep({.out = out, .budget = 9, .resume = true, .config = config}, *s3, trial);
    CHECK(third.completed);
    REQUIRE(third.trials.size() == 9);
    REQUIRE(resumed_flags.size() == 4);
    CHECK(resumed_flags[0]);  // trial 5's folder was left by the interrupted session
    CHECK_FALSE(resumed_flags[1]);

    for (size_t i = 0; i < 9; ++i) {
      CAPTURE(i);
      CHECK(third.trials[i].point == whole.trials[i].point);
      CHECK(third.trials[i].status == whole.trials[i].status);
      CHECK(third.trials[i].error == whole.trials[i].error);
      if (whole.trials[i].ok()) CHECK(third.trials[i].objective == whole.trials[i].objective);
    }
    CHECK(third.best == whole.best);
    CHECK(results_without_time(out / "results.jsonl") ==
          results_without_time(dir / (name + "-whole") / "results.jsonl"));
    CHECK(std::filesystem::exists(out / "plot.png"));
    CHECK(std::filesystem::exists(out / "trials" / "trial-0005"));
    const auto summary = read_text(out / "summary.md");
    CHECK(summary.find("## Best trial") != std::string::npos);
    const bool failures_listed =
        summary.find("failed: loss is NaN") != std::string::npos ||
        summary.find("failed: diverged") != std::string::npos ||
        std::all_of(third.trials.begin(), third.trials.end(), [](const sw::Trial& t) { return t.ok(); });
    CHECK(failures_listed);

    // A changed configuration is refused on resume, naming the key.
    auto s4 = sw::make_searcher(sc, space);
    json changed = config;
    changed["searcher"] = "grid";
    CHECK_THROWS_WITH_AS(sw::run_sweep({.out = out, .budget = 9, .resume = true, .config = changed}, *s4, trial),
                         doctest::Contains("differs from the stored one at /searcher"), rlhf::Error);
  }
}

TEST_CASE("sweep config: strict loading of `rlhf sweep` files") {
  rlhf::test::TempDir dir;
  const json space = json::array({{{"name", "ppo.kl_coef"}, {"kind", "log_uniform"}, {"low", 0.01}, {"high", 1.0}},
                                  {{"name", "ppo.base_lr"}, {"kind", "log_uniform"}, {"low", 1e-4}, {"high", 1e-2}}});
  json file = {{"out", (dir / "s").string()},
               {"budget", 4},
               {"searcher", {{"kind", "random"}}},
               {"space", space},
               {"base", {{"reward", {{"lexicon", "words.json"}}}, {"ppo", {{"total_phases", 10}}}}}};
  auto c = sw::load_ppo_sweep_config(file, "s.toml");
  CHECK(c.searcher.kind == sw::SearcherKind::random);
  CHECK(c.space.size() == 2);
  CHECK(c.base.ppo.total_phases == 10);
  auto resolved = sw::resolved_config(c);
  CHECK(resolved["space"] == c.space.to_json());
  CHECK(resolved["base"]["ppo"]["total_phases"] == 10);
  auto trial = sw::trial_config(c, json{{"ppo.kl_coef", 0.5}, {"ppo.base_lr", 1e-3}}, dir / "t", "s.toml");
  CHECK(trial.ppo.kl_coef == 0.5);
  CHECK(trial.ppo.base_lr == 1e-3);
  CHECK(trial.out == (dir / "t").string());

  json bad = file;
  bad["space"][0]["name"] = "ppo.kl_coeff";
  CHECK_THROWS_WITH_AS(sw::load_ppo_sweep_config(bad, "s.toml"),
                       "s.toml: unknown key 'base.ppo.kl_coeff' ---> HINT: did you mean 'base.ppo.kl_coef'?",
                       rlhf::Error);
  bad = file;
  bad["searcher"]["kind"] = "annealing";
  CHECK_THROWS_WITH_AS(sw::load_ppo_sweep_config(bad, "s.toml"),
                       "s.toml: key 'searcher.kind': 'annealing' is not one of bayes, random, grid", rlhf::Error);
  bad = file;
  bad.erase("space");
  CHECK_THROWS_WITH_AS(sw::load_ppo_sweep_config(bad, "s.toml"), doctest::Contains("the sweep needs a search space"),
                       rlhf::Error);
}

// ---- the issue-2 task: PPO with reward = number of '.' ----

namespace {

double count_periods(const std::string& text) { return static_cast<double>(std::count(text.begin(), text.end(), '.')); }

/// One PPO run of examples/ppo_char_count (small random GPT-2, byte-level tokenizer), logged to run_dir.
std::vector<json> char_count_run(double base_lr, double kl_coef, const std::filesystem::path& run_dir) {
  constexpr int64_t kPhases = 12;
  rlhf::PPOConfig config{.seed = 1,
                         .total_phases = kPhases,
                         .batch_size = 16,
                         .num_minibatches = 2,
                         .base_lr = base_lr,
                         .head_lr = 2e-3,
                         .warmup_steps = 2,
                         .final_scale = 0.5,
                         .gen_len = 12,
                         .top_k = 0,
                         .prefix = "This is",
                         .kl_coef = kl_coef,
                         .lambda = 0.95};
  torch::manual_seed(1);
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  using Policy = rlhf::ActorCritic<rlhf::GPT2<>>;
  Policy policy(rlhf::GPT2<>(rlhf::GPT2Config{.vocab_size = tokenizer.vocab_size(),
                                              .n_positions = 64,
                                              .n_embd = 32,
                                              .n_layer = 2,
                                              .n_head = 4,
                                              .bos_token_id = tokenizer.eos_id(),
                                              .eos_token_id = tokenizer.eos_id()}));
  auto reward = rlhf::FunctionReward(count_periods);
  rlhf::PPOTrainer<Policy, decltype(reward), rlhf::FixedKL> trainer(policy, reward, config, tokenizer);
  std::filesystem::create_directories(run_dir);
  rlhf::run::MetricsLog log(run_dir / "metrics.jsonl");
  for (int64_t i = 0; i < kPhases; ++i) {
    const auto stats = trainer.step();
    log.append(i + 1, {{"reward_mean", stats.reward_mean}, {"kl", stats.kl}});
  }
  return rlhf::run::read_metrics(run_dir / "metrics.jsonl");
}

}  // namespace

TEST_CASE("sweep over kl_coef and learning rate on the char-count task beats the defaults at bounded KL") {
  rlhf::test::TempDir dir;
  // Reward minus the KL beyond 4 nats per 12-token sample: the highest reward at bounded KL.
  const sw::ObjectiveConfig objective{.last = 4, .kl_penalty = 1.0, .kl_budget = 4.0};
  // The defaults of the swept knobs: PPOConfig's base_lr and kl_coef.
  const rlhf::PPOConfig defaults;
  const auto baseline =
      sw::evaluate_objective(objective, char_count_run(defaults.base_lr, defaults.kl_coef, dir / "defaults"));
  REQUIRE(baseline.ok());

  sw::SearchSpace space(
      {sw::Param::log_uniform("ppo.base_lr", 3e-4, 3e-2), sw::Param::log_uniform("ppo.kl_coef", 0.01, 3.0)});
  sw::BayesianSearch searcher(space, {.seed = 0, .initial = 4, .candidates = 500});
  // 12 trials: the runs are chaotic at high learning rates, and with 8 the search stopped short of the threshold
  // below on LibTorch 2.6 (best 0.31 '.' per sample; 0.52 on 1.13, where trials 0-4 already differ).
  sw::SweepOptions options{.out = dir / "sweep", .budget = 12, .title = "char count"};
  options.on_trial = [](const sw::Trial& t) {
    MESSAGE("trial " << t.index << " " << t.point.dump() << ": " << t.metrics.dump());
  };
  auto result = sw::run_sweep(options, searcher, [&](const sw::TrialContext& t) {
    const auto v = sw::evaluate_objective(objective, char_count_run(t.point["ppo.base_lr"].get<double>(),
                                                                    t.point["ppo.kl_coef"].get<double>(), t.run_dir));
    return sw::TrialOutcome{.objective = v.ok() ? v.value : NAN, .metrics = v.to_json(objective), .error = v.failure};
  });
  REQUIRE(result.best);
  const auto& best = result.trials[*result.best];
  const double best_reward = best.metrics["reward_mean"].get<double>(), best_kl = best.metrics["kl"].get<double>();
  MESSAGE("defaults (base_lr " << defaults.base_lr << ", kl_coef " << defaults.kl_coef << "): reward "
                               << baseline.metric << ", KL " << baseline.kl << "; best " << best.point.dump()
                               << ": reward " << best_reward << ", KL " << best_kl);
  CHECK(best.objective > baseline.value);
  CHECK(best_reward > 2 * baseline.metric + 0.25);  // clearly more '.' per sample
  CHECK(best_kl < objective.kl_budget + 1.0);       // at bounded KL
  CHECK(std::filesystem::exists(dir / "sweep" / "summary.md"));
}
