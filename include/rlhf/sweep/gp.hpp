#pragma once
/// @file Gaussian-process regression for Bayesian optimisation, in Eigen: a Matern 5/2 kernel with one length scale
/// per input dimension (ARD; or one per group of dimensions), hyperparameters fitted by maximising the log marginal
/// likelihood, posterior mean and variance through a Cholesky factor (never an inverse), and the expected-improvement
/// acquisition.
///
/// References: Rasmussen & Williams, "Gaussian Processes for Machine Learning", MIT Press 2006 (Matern kernel: eq.
/// 4.17; prediction: Algorithm 2.1; marginal likelihood: eq. 2.30); Jones, Schonlau & Welch, "Efficient Global
/// Optimization of Expensive Black-Box Functions", J. Global Optimization 13, 1998 (expected improvement); Snoek,
/// Larochelle & Adams, "Practical Bayesian Optimization of Machine Learning Algorithms", NeurIPS 2012 (Matern 5/2
/// with ARD for hyperparameter search).
///
///     rlhf::sweep::GaussianProcess gp;          // fits its hyperparameters on fit()
///     gp.fit(X, y);                             // X [n, d] in the unit cube, y [n]
///     auto p = gp.predict(Xs);                  // p.mean [m], p.variance [m] (of the latent function)
///     double ei = rlhf::sweep::expected_improvement(p.mean[0], p.variance[0], y.maxCoeff());

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numbers>
#include <optional>
#include <utility>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <rlhf/detail/error.hpp>

namespace rlhf::sweep {

/// The kernel's hyperparameters: k(x, x') = signal_variance (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r) with
/// r^2 = sum_d (x_d - x'_d)^2 / length_scales_d^2, plus noise_variance on the diagonal of the training covariance.
/// With GPOptions::length_scale_groups, the dimensions of a group share one length scale.
struct GPHyperparameters {
  Eigen::VectorXd length_scales;  ///< one per input dimension or group, e.g. {0.3, 0.3} (inputs in [0, 1])
  double signal_variance = 1.0;   ///< prior variance of the function, e.g. 1 (outputs standardised)
  double noise_variance = 1e-6;   ///< observation noise variance, e.g. 1e-6 (nearly noise-free)
};

/// Options of GaussianProcess.
struct GPOptions {
  bool standardize = true;            ///< fit to (y - mean) / std and predict in y's units
  bool fit_hyperparameters = true;    ///< maximise the log marginal likelihood on fit(); else keep `initial`
  GPHyperparameters initial;          ///< fixed hyperparameters (fit_hyperparameters = false), or empty for the
                                      ///< default start (length scales 0.5, signal 1, noise 1e-4)
  double min_length_scale = 0.01;     ///< bounds of the fit, in input units, e.g. 0.01
  double max_length_scale = 10.0;     ///< e.g. 10
  double min_signal_variance = 0.05;  ///< e.g. 0.05 (in standardised units)
  double max_signal_variance = 20.0;  ///< e.g. 20
  double min_noise_variance = 1e-6;   ///< e.g. 1e-6
  double max_noise_variance = 0.5;    ///< e.g. 0.5
  int64_t max_evaluations = 400;      ///< likelihood evaluations per Nelder-Mead start, e.g. 400
  /// Input column j uses length scale length_scale_groups[j]: e.g. {0, 1, 1, 1} for a number and the three one-hot
  /// coordinates of a categorical parameter, which then share one length scale. The groups are numbered 0, 1, ...,
  /// k - 1, each used; empty: one length scale per column (plain ARD).
  std::vector<int64_t> length_scale_groups;
};

/// Posterior of the latent function at test points.
struct GPPrediction {
  Eigen::VectorXd mean;      ///< [m]
  Eigen::VectorXd variance;  ///< [m], >= 0, without the observation noise
};

// ---- kernel ----

/// The Matern 5/2 correlation at scaled distance r >= 0: (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r).
inline double matern52(double r) {
  const double s = std::sqrt(5.0) * r;
  return (1.0 + s + s * s / 3.0) * std::exp(-s);
}

/// The kernel matrix K[i, j] = k(A.row(i), B.row(j)) for rows of inputs A [n, d] and B [m, d].
inline Eigen::MatrixXd matern52_kernel(const Eigen::MatrixXd& A, const Eigen::MatrixXd& B, const GPHyperparameters& h) {
  if (A.cols() != B.cols() || A.cols() != h.length_scales.size())
    rlhf::detail::fail("gp: inputs have {} and {} columns, the kernel has {} length scales", A.cols(), B.cols(),
                       h.length_scales.size());
  const Eigen::RowVectorXd inv = h.length_scales.cwiseInverse().transpose();
  const Eigen::MatrixXd As = A.array().rowwise() * inv.array();
  const Eigen::MatrixXd Bs = B.array().rowwise() * inv.array();
  Eigen::MatrixXd K(A.rows(), B.rows());
  for (Eigen::Index i = 0; i < A.rows(); ++i)
    for (Eigen::Index j = 0; j < B.rows(); ++j) K(i, j) = h.signal_variance * matern52((As.row(i) - Bs.row(j)).norm());
  return K;
}

namespace detail {

/// Cholesky factor of K + noise I; adds growing jitter (up to 1e-4 of the mean diagonal) when K is numerically not
/// positive definite. Returns nothing when even that fails.
inline std::optional<Eigen::LLT<Eigen::MatrixXd>> cholesky(const Eigen::MatrixXd& K, double noise) {
  const Eigen::Index n = K.rows();
  const double scale = n > 0 ? K.diagonal().mean() : 1.0;
  double jitter = 0.0;
  for (int attempt = 0; attempt < 8; ++attempt) {
    Eigen::MatrixXd A = K;
    A.diagonal().array() += noise + jitter;
    Eigen::LLT<Eigen::MatrixXd> llt(A);
    if (llt.info() == Eigen::Success) return llt;
    jitter = jitter == 0.0 ? 1e-11 * scale : jitter * 10.0;
  }
  return std::nullopt;
}

/// The log marginal likelihood log p(y | X, h) = -1/2 y^T (K + s2 I)^-1 y - sum log diag(L) - n/2 log 2 pi (R&W eq.
/// 2.30), or -inf when the covariance cannot be factored.
inline double log_marginal_likelihood(const Eigen::MatrixXd& X, const Eigen::VectorXd& y, const GPHyperparameters& h) {
  const auto llt = cholesky(matern52_kernel(X, X, h), h.noise_variance);
  if (!llt) return -std::numeric_limits<double>::infinity();
  const Eigen::VectorXd alpha = llt->solve(y);
  const double log_det_half = llt->matrixLLT().diagonal().array().log().sum();
  return -0.5 * y.dot(alpha) - log_det_half - 0.5 * static_cast<double>(y.size()) * std::log(2.0 * std::numbers::pi);
}

/// Minimises f from x0 with the Nelder-Mead simplex (reflection 1, expansion 2, contraction 1/2, shrink 1/2),
/// initial simplex x0 + step e_i, at most `max_evaluations` calls. Deterministic. Returns the best point.
inline Eigen::VectorXd nelder_mead(const std::function<double(const Eigen::VectorXd&)>& f, const Eigen::VectorXd& x0,
                                   double step, int64_t max_evaluations, double* best_value = nullptr) {
  const Eigen::Index n = x0.size();
  std::vector<Eigen::VectorXd> simplex(static_cast<size_t>(n + 1), x0);
  std::vector<double> values(static_cast<size_t>(n + 1));
  for (Eigen::Index i = 0; i < n; ++i) simplex[static_cast<size_t>(i + 1)](i) += step;
  int64_t evaluations = 0;
  auto eval = [&](const Eigen::VectorXd& x) {
    ++evaluations;
    const double v = f(x);
    return std::isfinite(v) ? v : std::numeric_limits<double>::max();
  };
  for (size_t i = 0; i < simplex.size(); ++i) values[i] = eval(simplex[i]);
  std::vector<size_t> order(simplex.size());
  while (evaluations < max_evaluations) {
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return values[a] < values[b]; });
    const size_t best = order.front(), worst = order.back(), second = order[order.size() - 2];
    if (std::abs(values[worst] - values[best]) < 1e-10 * (1.0 + std::abs(values[best]))) break;
    Eigen::VectorXd centroid = Eigen::VectorXd::Zero(n);
    for (size_t i = 0; i < simplex.size(); ++i)
      if (i != worst) centroid += simplex[i];
    centroid /= static_cast<double>(n);
    const Eigen::VectorXd reflected = centroid + (centroid - simplex[worst]);
    const double fr = eval(reflected);
    if (fr < values[best]) {
      const Eigen::VectorXd expanded = centroid + 2.0 * (centroid - simplex[worst]);
      const double fe = eval(expanded);
      if (fe < fr) {
        simplex[worst] = expanded;
        values[worst] = fe;
      } else {
        simplex[worst] = reflected;
        values[worst] = fr;
      }
      continue;
    }
    if (fr < values[second]) {
      simplex[worst] = reflected;
      values[worst] = fr;
      continue;
    }
    const bool outside = fr < values[worst];
    const Eigen::VectorXd contracted = outside ? Eigen::VectorXd(centroid + 0.5 * (reflected - centroid))
                                               : Eigen::VectorXd(centroid + 0.5 * (simplex[worst] - centroid));
    const double fc = eval(contracted);
    if (fc < (outside ? fr : values[worst])) {
      simplex[worst] = contracted;
      values[worst] = fc;
      continue;
    }
    for (size_t i = 0; i < simplex.size(); ++i) {
      if (i == best) continue;
      simplex[i] = simplex[best] + 0.5 * (simplex[i] - simplex[best]);
      values[i] = eval(simplex[i]);
    }
  }
  const auto best = static_cast<size_t>(std::min_element(values.begin(), values.end()) - values.begin());
  if (best_value) *best_value = values[best];
  return simplex[best];
}

}  // namespace detail

// ---- the model ----

/// Gaussian-process regression with a Matern 5/2 ARD kernel (see the file comment). Inputs are rows of X, meant to
/// lie in the unit cube (the length-scale bounds assume it); outputs are standardised internally by default.
///
/// fit() maximises the log marginal likelihood over log length scales, log signal variance and log noise variance
/// (box-bounded) with Nelder-Mead from a few fixed starts: deterministic for given data. With
/// GPOptions::length_scale_groups the columns of a group share one length scale (one hyperparameter).
class GaussianProcess {
 public:
  /// A process with `options` (hyperparameters are fitted on fit() unless options.fit_hyperparameters is false).
  explicit GaussianProcess(GPOptions options = {}) : options_(std::move(options)) {}

  /// Conditions the process on inputs X [n, d] and outputs y [n] (finite). Fits the hyperparameters first when
  /// the options say so. Throws rlhf::Error for mismatched shapes, non-finite values or a covariance that cannot
  /// be factored.
  void fit(const Eigen::MatrixXd& X, const Eigen::VectorXd& y) {
    if (X.rows() != y.size() || X.rows() == 0)
      rlhf::detail::fail("gp: fit needs one output per input row and at least one row, got {} rows and {} outputs",
                         X.rows(), y.size());
    if (!X.allFinite() || !y.allFinite()) rlhf::detail::fail("gp: inputs and outputs must be finite");
    const Eigen::Index scales = set_groups(X.cols());
    X_ = X;
    mean_ = 0.0;
    scale_ = 1.0;
    if (options_.standardize) {
      mean_ = y.mean();
      const double var = y.size() > 1 ? (y.array() - mean_).square().sum() / static_cast<double>(y.size()) : 0.0;
      scale_ = var > 1e-24 ? std::sqrt(var) : 1.0;
    }
    y_ = (y.array() - mean_) / scale_;
    hyper_ = start_hyperparameters(scales);
    if (options_.fit_hyperparameters) fit_hyperparameters();
    factor();
  }

  /// Posterior mean and variance of the latent function at the rows of Xs [m, d], in y's units: mean = k*^T alpha,
  /// variance = k(x, x) - v^T v with v = L^-1 k* (R&W Algorithm 2.1).
  GPPrediction predict(const Eigen::MatrixXd& Xs) const {
    require_fitted();
    const Eigen::MatrixXd Ks = matern52_kernel(X_, Xs, per_column(hyper_));  // [n, m]
    GPPrediction out;
    out.mean = (Ks.transpose() * alpha_).array() * scale_ + mean_;
    const Eigen::MatrixXd V = llt_->matrixL().solve(Ks);  // [n, m]
    out.variance = (hyper_.signal_variance - V.colwise().squaredNorm().transpose().array()).max(0.0) * scale_ * scale_;
    return out;
  }

  /// The prior covariance K[i, j] = k(A.row(i), B.row(j)) under the hyperparameters in use, in standardised units
  /// (signal_variance where two rows are equal).
  Eigen::MatrixXd kernel(const Eigen::MatrixXd& A, const Eigen::MatrixXd& B) const {
    require_fitted();
    return matern52_kernel(A, B, per_column(hyper_));
  }

  /// The log marginal likelihood of the (standardised) training outputs under the current hyperparameters.
  double log_marginal_likelihood() const {
    require_fitted();
    return detail::log_marginal_likelihood(X_, y_, per_column(hyper_));
  }

  /// The hyperparameters in use (fitted or fixed), in standardised units; one length scale per group of columns
  /// with GPOptions::length_scale_groups.
  const GPHyperparameters& hyperparameters() const noexcept { return hyper_; }
  /// The options.
  const GPOptions& options() const noexcept { return options_; }
  /// Whether fit() has been called.
  bool fitted() const noexcept { return llt_.has_value(); }

 private:
  /// Reads options_.length_scale_groups for inputs of `columns` columns into group_of_; returns the number of length
  /// scales.
  Eigen::Index set_groups(Eigen::Index columns) {
    const auto& groups = options_.length_scale_groups;
    group_of_.clear();
    if (groups.empty()) return columns;
    if (static_cast<Eigen::Index>(groups.size()) != columns)
      rlhf::detail::fail("gp: length_scale_groups has {} entries, expected one per input column ({})", groups.size(),
                         columns);
    for (const int64_t g : groups)
      if (g < 0) rlhf::detail::fail("gp: length_scale_groups: expected group indices >= 0, got {}", g);
    const int64_t count = *std::max_element(groups.begin(), groups.end()) + 1;
    std::vector<bool> used(static_cast<size_t>(count), false);
    for (const int64_t g : groups) used[static_cast<size_t>(g)] = true;
    for (int64_t g = 0; g < count; ++g)
      if (!used[static_cast<size_t>(g)])
        rlhf::detail::fail("gp: length_scale_groups: expected the groups 0 to {} each used, group {} has no column",
                           count - 1, g);
    group_of_ = groups;
    return static_cast<Eigen::Index>(count);
  }

  /// `h` with one length scale per input column (its group's).
  GPHyperparameters per_column(const GPHyperparameters& h) const {
    if (group_of_.empty()) return h;
    Eigen::VectorXd scales(static_cast<Eigen::Index>(group_of_.size()));
    for (size_t j = 0; j < group_of_.size(); ++j)
      scales(static_cast<Eigen::Index>(j)) = h.length_scales(static_cast<Eigen::Index>(group_of_[j]));
    return GPHyperparameters{
        .length_scales = std::move(scales), .signal_variance = h.signal_variance, .noise_variance = h.noise_variance};
  }

  GPHyperparameters start_hyperparameters(Eigen::Index d) const {
    GPHyperparameters h = options_.initial;
    if (h.length_scales.size() == 0) {
      h.length_scales = Eigen::VectorXd::Constant(d, 0.5);
      if (options_.fit_hyperparameters) h.noise_variance = 1e-4;
    }
    if (h.length_scales.size() != d)
      rlhf::detail::fail("gp: {} length scales given, expected {} (one per input column or length-scale group)",
                         h.length_scales.size(), d);
    if (!(h.length_scales.array() > 0).all() || !(h.signal_variance > 0) || !(h.noise_variance >= 0))
      rlhf::detail::fail("gp: length scales and the signal variance must be positive, the noise variance non-negative");
    return h;
  }

  /// Box-bounded maximisation of the log marginal likelihood in log space, from starts at length scales 0.2, 0.5
  /// and 1.5; the objective clamps each coordinate to its bounds and adds the squared excursion as a penalty.
  void fit_hyperparameters() {
    const Eigen::Index d = hyper_.length_scales.size();
    Eigen::VectorXd lo(d + 2), hi(d + 2);
    lo.head(d).setConstant(std::log(options_.min_length_scale));
    hi.head(d).setConstant(std::log(options_.max_length_scale));
    lo(d) = std::log(options_.min_signal_variance);
    hi(d) = std::log(options_.max_signal_variance);
    lo(d + 1) = std::log(options_.min_noise_variance);
    hi(d + 1) = std::log(options_.max_noise_variance);
    auto unpack = [&](const Eigen::VectorXd& theta) {
      const Eigen::VectorXd t = theta.cwiseMax(lo).cwiseMin(hi);
      GPHyperparameters h;
      h.length_scales = t.head(d).array().exp();
      h.signal_variance = std::exp(t(d));
      h.noise_variance = std::exp(t(d + 1));
      return h;
    };
    auto objective = [&](const Eigen::VectorXd& theta) {
      const double excursion = (theta - theta.cwiseMax(lo).cwiseMin(hi)).squaredNorm();
      return -detail::log_marginal_likelihood(X_, y_, per_column(unpack(theta))) + 10.0 * excursion;
    };
    double best_value = std::numeric_limits<double>::infinity();
    Eigen::VectorXd best_theta;
    for (const double start : {0.2, 0.5, 1.5}) {
      Eigen::VectorXd theta0(d + 2);
      theta0.head(d).setConstant(std::log(start));
      theta0(d) = 0.0;
      theta0(d + 1) = std::log(1e-3);
      double value = 0.0;
      const Eigen::VectorXd theta = detail::nelder_mead(objective, theta0, 0.7, options_.max_evaluations, &value);
      if (value < best_value) {
        best_value = value;
        best_theta = theta;
      }
    }
    if (best_theta.size() > 0 && std::isfinite(best_value)) hyper_ = unpack(best_theta);
  }

  void factor() {
    llt_ = detail::cholesky(matern52_kernel(X_, X_, per_column(hyper_)), hyper_.noise_variance);
    if (!llt_)
      rlhf::detail::fail(
          "gp: the covariance of {} points is not positive definite even with jitter ---> HINT: remove "
          "duplicate inputs or raise the noise variance",
          X_.rows());
    alpha_ = llt_->solve(y_);
  }

  void require_fitted() const {
    if (!llt_) rlhf::detail::fail("gp: call fit() before predicting");
  }

  GPOptions options_;
  GPHyperparameters hyper_;
  std::vector<int64_t> group_of_;  ///< length-scale group of each input column; empty: one scale per column
  Eigen::MatrixXd X_;
  Eigen::VectorXd y_;
  Eigen::VectorXd alpha_;
  std::optional<Eigen::LLT<Eigen::MatrixXd>> llt_;
  double mean_ = 0.0;
  double scale_ = 1.0;
};

// ---- acquisition ----

/// Expected improvement of a maximisation at a point whose posterior is N(mean, variance) over the best value so
/// far: (mean - best - xi) Phi(z) + sigma phi(z), z = (mean - best - xi) / sigma (Jones et al. 1998); xi >= 0 trades
/// exploitation for exploration. With zero variance, max(0, mean - best - xi).
inline double expected_improvement(double mean, double variance, double best, double xi = 0.0) {
  const double improvement = mean - best - xi;
  const double sigma = std::sqrt(std::max(variance, 0.0));
  if (sigma < 1e-12) return std::max(improvement, 0.0);
  const double z = improvement / sigma;
  const double cdf = 0.5 * std::erfc(-z / std::sqrt(2.0));
  const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2.0 * std::numbers::pi);
  return improvement * cdf + sigma * pdf;
}

}  // namespace rlhf::sweep
