#pragma once
/// @file Search spaces of a hyperparameter sweep: named parameters with uniform, log-uniform, integer and categorical
/// ranges, each mapped to and from [0, 1] so that the searchers (search.hpp) work in the unit cube, and to the inputs
/// of a Gaussian process (features(): a categorical parameter becomes one one-hot coordinate per choice).
///
///     rlhf::sweep::SearchSpace space({
///         rlhf::sweep::Param::log_uniform("ppo.base_lr", 1e-4, 1e-2),
///         rlhf::sweep::Param::uniform("ppo.kl_coef", 0.0, 0.5),
///         rlhf::sweep::Param::integer("lora.rank", 2, 32, /*log=*/true),
///         rlhf::sweep::Param::categorical("ppo.kl_estimator", {"k1", "k3"})});
///     rlhf::sweep::Point p = space.from_unit({0.5, 0.1, 0.9, 0.2});
///     // {"ppo.base_lr": 0.001, "ppo.kl_coef": 0.05, "lora.rank": 23, "ppo.kl_estimator": "k1"}
///
/// A point is a JSON object from parameter name to value: a double for uniform and log-uniform parameters, an
/// integer for integer ones, the choice itself (number, string or boolean) for categorical ones. The names are
/// dotted config keys, so a point applies to a config as overrides (apply_point()).

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <rlhf/config/config_file.hpp>
#include <rlhf/detail/error.hpp>

namespace rlhf::sweep {

/// A point of a search space: {"ppo.kl_coef": 0.05, "lora.rank": 8, ...}.
using Point = nlohmann::json;

/// How a parameter's range is drawn and mapped to [0, 1].
enum class ParamKind {
  uniform,      ///< a double in [low, high], linear
  log_uniform,  ///< a double in [low, high] (low > 0), linear in log(value): learning rates, KL coefficients
  integer,      ///< an integer in [low, high], linear (or in log(value) with `log`): LoRA rank, epochs
  categorical,  ///< one of `choices` (numbers, strings or booleans)
};

/// The names of ParamKind in config files.
constexpr auto enum_names(ParamKind) {
  using Name = std::pair<std::string_view, ParamKind>;
  return std::array{Name{"uniform", ParamKind::uniform},        Name{"log_uniform", ParamKind::log_uniform},
                    Name{"integer", ParamKind::integer},        Name{"categorical", ParamKind::categorical},
                    Name{"loguniform", ParamKind::log_uniform}, Name{"int", ParamKind::integer},
                    Name{"choice", ParamKind::categorical}};
}

/// The canonical name of a ParamKind ("log_uniform").
inline std::string_view kind_name(ParamKind kind) {
  for (const auto& [name, value] : enum_names(kind))
    if (value == kind) return name;
  return "?";
}

/// One dimension of a search space.
struct Param {
  std::string name;                     ///< dotted config key, e.g. "ppo.kl_coef"
  ParamKind kind = ParamKind::uniform;  ///< range type
  double low = 0.0;                     ///< lower bound (uniform, log_uniform, integer), e.g. 1e-4
  double high = 1.0;                    ///< upper bound, inclusive, e.g. 1e-2
  bool log = false;                     ///< integer only: spaced in log(value) (needs low >= 1), e.g. LoRA rank
  std::vector<nlohmann::json> choices;  ///< categorical only: the values, e.g. {"k1", "k3"} or {4, 8, 16}

  /// A double in [low, high].
  static Param uniform(std::string name, double low, double high) {
    return Param{.name = std::move(name), .kind = ParamKind::uniform, .low = low, .high = high};
  }
  /// A double in [low, high], uniform in log(value); 0 < low.
  static Param log_uniform(std::string name, double low, double high) {
    return Param{.name = std::move(name), .kind = ParamKind::log_uniform, .low = low, .high = high};
  }
  /// An integer in [low, high]; with `log`, spaced in log(value) (1 <= low).
  static Param integer(std::string name, int64_t low, int64_t high, bool log = false) {
    return Param{.name = std::move(name),
                 .kind = ParamKind::integer,
                 .low = static_cast<double>(low),
                 .high = static_cast<double>(high),
                 .log = log};
  }
  /// One of `choices` (JSON scalars).
  static Param categorical(std::string name, std::vector<nlohmann::json> choices) {
    return Param{.name = std::move(name), .kind = ParamKind::categorical, .choices = std::move(choices)};
  }

  /// Throws rlhf::Error naming the parameter when its range is empty or inconsistent.
  void validate() const {
    if (name.empty()) rlhf::detail::fail("sweep: a parameter has an empty name");
    if (kind == ParamKind::categorical) {
      if (choices.empty()) rlhf::detail::fail("sweep: parameter '{}': a categorical parameter needs choices", name);
      for (const auto& c : choices)
        if (!(c.is_number() || c.is_string() || c.is_boolean()))
          rlhf::detail::fail("sweep: parameter '{}': a choice must be a number, string or boolean, got {}", name,
                             c.dump());
      return;
    }
    if (!(std::isfinite(low) && std::isfinite(high) && low <= high))
      rlhf::detail::fail("sweep: parameter '{}': expected finite bounds with low <= high, got [{}, {}]", name, low,
                         high);
    if (kind == ParamKind::log_uniform && !(low > 0))
      rlhf::detail::fail("sweep: parameter '{}': a log_uniform range needs low > 0, got {}", name, low);
    if (kind == ParamKind::integer) {
      if (low != std::round(low) || high != std::round(high))
        rlhf::detail::fail("sweep: parameter '{}': integer bounds must be whole numbers, got [{}, {}]", name, low,
                           high);
      if (log && !(low >= 1))
        rlhf::detail::fail("sweep: parameter '{}': a log-spaced integer range needs low >= 1, got {}", name, low);
    } else if (log) {
      rlhf::detail::fail("sweep: parameter '{}': `log` applies to integer parameters (use kind log_uniform)", name);
    }
  }

  /// The value at `u` in [0, 1] (clamped): low + u (high - low) for uniform, low (high / low)^u for log-uniform,
  /// that rounded to the nearest integer for integer, choice floor(u n) of n for categorical.
  nlohmann::json from_unit(double u) const {
    u = std::clamp(std::isfinite(u) ? u : 0.0, 0.0, 1.0);
    if (kind == ParamKind::uniform || kind == ParamKind::log_uniform) {
      if (u == 0.0) return low;  // the ends exactly, whatever exp(log(x)) rounds to
      if (u == 1.0) return high;
    }
    switch (kind) {
      case ParamKind::uniform:
        return low + u * (high - low);
      case ParamKind::log_uniform:
        return std::exp(std::log(low) + u * (std::log(high) - std::log(low)));
      case ParamKind::integer: {
        const double v = log ? std::exp(std::log(low) + u * (std::log(high) - std::log(low))) : low + u * (high - low);
        return static_cast<int64_t>(std::clamp(std::round(v), low, high));
      }
      case ParamKind::categorical: {
        const auto n = choices.size();
        return choices[std::min(static_cast<size_t>(u * static_cast<double>(n)), n - 1)];
      }
    }
    return nullptr;
  }

  /// The position in [0, 1] of `value` (the inverse of from_unit() up to rounding): a categorical choice maps to
  /// the middle of its interval, (i + 0.5) / n; a one-value range to 0.5. Throws rlhf::Error for a value of the
  /// wrong type, outside the range or not among the choices.
  double to_unit(const nlohmann::json& value) const {
    if (kind == ParamKind::categorical)
      return (static_cast<double>(choice_index(value)) + 0.5) / static_cast<double>(choices.size());
    if (!value.is_number()) rlhf::detail::fail("sweep: parameter '{}': expected a number, got {}", name, value.dump());
    const double v = value.get<double>();
    const double tolerance = 1e-9 * std::max(1.0, std::max(std::abs(low), std::abs(high)));
    if (!(v >= low - tolerance && v <= high + tolerance))
      rlhf::detail::fail("sweep: parameter '{}': {} is outside [{}, {}]", name, v, low, high);
    if (high == low) return 0.5;
    const bool logarithmic = kind == ParamKind::log_uniform || (kind == ParamKind::integer && log);
    const double u =
        logarithmic ? (std::log(v) - std::log(low)) / (std::log(high) - std::log(low)) : (v - low) / (high - low);
    return std::clamp(u, 0.0, 1.0);
  }

  /// The index of `value` among the choices of a categorical parameter. Throws rlhf::Error when it is not one of
  /// them.
  size_t choice_index(const nlohmann::json& value) const {
    for (size_t i = 0; i < choices.size(); ++i)
      if (choices[i] == value) return i;
    rlhf::detail::fail("sweep: parameter '{}': {} is not one of the choices {}", name, value.dump(),
                       nlohmann::json(choices).dump());
  }

  /// Number of Gaussian-process features of the parameter (append_features()): n for a categorical parameter with
  /// n choices, 1 otherwise.
  size_t feature_size() const noexcept { return kind == ParamKind::categorical ? choices.size() : 1; }

  /// Appends the Gaussian-process features of `value` to `out`: for a categorical parameter the one-hot indicator
  /// of its choice (1 at the choice's index, 0 at the others), so that every two different choices are equally far
  /// apart whatever their order; for an integer one the unit coordinate of the integer nearest to it; for the
  /// others to_unit(value). Throws like to_unit().
  void append_features(const nlohmann::json& value, std::vector<double>& out) const {
    if (kind == ParamKind::categorical) {
      const size_t index = choice_index(value);
      for (size_t i = 0; i < choices.size(); ++i) out.push_back(i == index ? 1.0 : 0.0);
    } else if (kind == ParamKind::integer) {
      out.push_back(to_unit(from_unit(to_unit(value))));
    } else {
      out.push_back(to_unit(value));
    }
  }

  /// The values of a grid over the parameter: `n` evenly spaced in unit space, ends included (the middle for
  /// n = 1); every integer of the range when there are at most n; every choice of a categorical parameter.
  std::vector<nlohmann::json> grid(int64_t n) const {
    if (n < 1) rlhf::detail::fail("sweep: parameter '{}': a grid needs at least one point per axis, got {}", name, n);
    std::vector<nlohmann::json> values;
    if (kind == ParamKind::categorical) return choices;
    if (kind == ParamKind::integer && high - low + 1 <= static_cast<double>(n)) {
      for (auto v = static_cast<int64_t>(low); v <= static_cast<int64_t>(high); ++v) values.emplace_back(v);
      return values;
    }
    for (int64_t i = 0; i < n; ++i) {
      auto value = from_unit(n == 1 ? 0.5 : static_cast<double>(i) / static_cast<double>(n - 1));
      if (std::find(values.begin(), values.end(), value) == values.end()) values.push_back(std::move(value));
    }
    return values;
  }

  /// {"name", "kind", "low", "high"} (with "log" for integers), or {"name", "kind", "choices"}: the form
  /// SearchSpace::from_json() reads.
  nlohmann::json to_json() const {
    nlohmann::json out = {{"name", name}, {"kind", kind_name(kind)}};
    if (kind == ParamKind::categorical) {
      out["choices"] = choices;
    } else if (kind == ParamKind::integer) {
      out["low"] = static_cast<int64_t>(low);
      out["high"] = static_cast<int64_t>(high);
      out["log"] = log;
    } else {
      out["low"] = low;
      out["high"] = high;
    }
    return out;
  }
};

/// The parameters of a sweep, in order: dimension i of the unit cube is params[i].
class SearchSpace {
 public:
  SearchSpace() = default;
  /// Validates every parameter and refuses duplicate names.
  explicit SearchSpace(std::vector<Param> params) : params_(std::move(params)) {
    if (params_.empty()) rlhf::detail::fail("sweep: the search space has no parameters");
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].validate();
      for (size_t j = 0; j < i; ++j)
        if (params_[j].name == params_[i].name)
          rlhf::detail::fail("sweep: parameter '{}' appears twice in the search space", params_[i].name);
    }
  }

  /// The parameters.
  const std::vector<Param>& params() const noexcept { return params_; }
  /// Number of dimensions.
  size_t size() const noexcept { return params_.size(); }

  /// The point at `u` (one coordinate in [0, 1] per parameter).
  Point from_unit(const std::vector<double>& u) const {
    check_size(u.size());
    Point point = Point::object();
    for (size_t i = 0; i < params_.size(); ++i) point[params_[i].name] = params_[i].from_unit(u[i]);
    return point;
  }

  /// The unit-cube coordinates of `point` (which must hold every parameter and nothing else).
  std::vector<double> to_unit(const Point& point) const {
    check_point(point);
    std::vector<double> u;
    u.reserve(params_.size());
    for (const auto& p : params_) u.push_back(p.to_unit(value_of(point, p)));
    return u;
  }

  /// `u` moved to the unit coordinates of the point it maps to: integer and categorical coordinates snap to their
  /// values.
  std::vector<double> snap(const std::vector<double>& u) const { return to_unit(from_unit(u)); }

  /// Number of Gaussian-process features (features()): one per numeric parameter, one per choice of each
  /// categorical parameter; e.g. 4 for a uniform parameter and a categorical one with 3 choices.
  size_t feature_size() const noexcept {
    size_t n = 0;
    for (const auto& p : params_) n += p.feature_size();
    return n;
  }

  /// The parameter of each feature, by index: e.g. {0, 1, 1, 1} for a uniform parameter and a categorical one with
  /// 3 choices. BayesianSearch gives the features of one parameter one shared length scale
  /// (GPOptions::length_scale_groups).
  std::vector<int64_t> feature_params() const {
    std::vector<int64_t> out;
    out.reserve(feature_size());
    for (size_t i = 0; i < params_.size(); ++i)
      out.insert(out.end(), params_[i].feature_size(), static_cast<int64_t>(i));
    return out;
  }

  /// The inputs of a Gaussian process at `point` (which must hold every parameter and nothing else), in parameter
  /// order (Param::append_features()): the unit coordinate of a uniform or log-uniform parameter, the snapped unit
  /// coordinate of an integer one, the one-hot indicator of a categorical one's choice. E.g. {0.25, 0, 1, 0} for
  /// {"x": 2.5, "c": "k3"} with x uniform in [0, 10] and c in {"k1", "k3", "abs"}.
  std::vector<double> features(const Point& point) const {
    check_point(point);
    std::vector<double> f;
    f.reserve(feature_size());
    for (const auto& p : params_) p.append_features(value_of(point, p), f);
    return f;
  }

  /// The features of the point at unit coordinates `u`, features(from_unit(u)): integer and categorical coordinates
  /// snap to their values first, so features describe valid points only. E.g. {0.25, 0, 0, 1} for u = {0.25, 0.9}
  /// in the space of features().
  std::vector<double> unit_features(const std::vector<double>& u) const { return features(from_unit(u)); }

  /// The full grid (the Cartesian product of Param::grid(n) per parameter; the first parameter varies slowest).
  std::vector<Point> grid(int64_t points_per_axis) const {
    std::vector<Point> points{Point::object()};
    for (const auto& p : params_) {
      std::vector<Point> next;
      for (const auto& partial : points) {
        for (const auto& value : p.grid(points_per_axis)) {
          Point q = partial;
          q[p.name] = value;
          next.push_back(std::move(q));
        }
      }
      points = std::move(next);
    }
    return points;
  }

  /// Whether a parameter is called `name`.
  bool contains(std::string_view name) const {
    return std::any_of(params_.begin(), params_.end(), [&](const Param& p) { return p.name == name; });
  }

  /// The space as a JSON array of Param::to_json().
  nlohmann::json to_json() const {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& p : params_) out.push_back(p.to_json());
    return out;
  }

  /// Reads a space from a JSON array of tables (TOML `[[space]]`), strictly: each table has `name`, `kind` (uniform,
  /// log_uniform, integer, categorical) and `low` + `high` (and optionally `log` for integers) or `choices`.
  /// `source` names the file for messages: "sweep.toml: key 'space[1].kind': 'logunif' is not one of ...".
  static SearchSpace from_json(const nlohmann::json& array, const std::string& source,
                               const std::string& key = "space") {
    namespace cd = rlhf::config::detail;
    if (!array.is_array() || array.empty())
      rlhf::detail::fail("{}: key '{}': expected a non-empty array of parameter tables ([[{}]] in TOML), got {}",
                         source, key, key, cd::describe_value(array));
    std::vector<Param> params;
    for (size_t i = 0; i < array.size(); ++i) {
      const auto& table = array[i];
      const std::string at = fmt::format("{}[{}]", key, i);
      if (!table.is_object())
        rlhf::detail::fail("{}: key '{}': expected a table, got {}", source, at, cd::describe_value(table));
      static const std::vector<std::string> kKnown = {"name", "kind", "low", "high", "log", "choices"};
      for (const auto& [k, value] : table.items()) {
        if (std::find(kKnown.begin(), kKnown.end(), k) != kKnown.end()) continue;
        if (auto guess = cd::closest_key(k, kKnown))
          rlhf::detail::fail("{}: unknown key '{}.{}' ---> HINT: did you mean '{}.{}'?", source, at, k, at, *guess);
        rlhf::detail::fail("{}: unknown key '{}.{}' ---> HINT: the keys of a parameter are: {}", source, at, k,
                           fmt::join(kKnown, ", "));
      }
      Param p;
      if (!table.contains("name"))
        rlhf::detail::fail("{}: key '{}': the parameter needs a name (a dotted config key)", source, at);
      cd::bind_value(table["name"], p.name, source, at + ".name");
      if (!table.contains("kind"))
        rlhf::detail::fail("{}: key '{}': parameter '{}' needs a kind (uniform, log_uniform, integer, categorical)",
                           source, at, p.name);
      cd::bind_value(table["kind"], p.kind, source, at + ".kind");
      if (p.kind == ParamKind::categorical) {
        for (const char* k : {"low", "high", "log"})
          if (table.contains(k))
            rlhf::detail::fail("{}: key '{}.{}': a categorical parameter takes `choices`, not `{}`", source, at, k, k);
        if (!table.contains("choices") || !table["choices"].is_array())
          rlhf::detail::fail("{}: key '{}.choices': a categorical parameter needs an array of choices", source, at);
        p.choices.assign(table["choices"].begin(), table["choices"].end());
      } else {
        if (table.contains("choices"))
          rlhf::detail::fail("{}: key '{}.choices': only categorical parameters take choices", source, at);
        for (const char* k : {"low", "high"})
          if (!table.contains(k)) rlhf::detail::fail("{}: key '{}': parameter '{}' needs `{}`", source, at, p.name, k);
        if (p.kind == ParamKind::integer) {
          int64_t low = 0, high = 0;
          cd::bind_value(table["low"], low, source, at + ".low");
          cd::bind_value(table["high"], high, source, at + ".high");
          p.low = static_cast<double>(low);
          p.high = static_cast<double>(high);
        } else {
          cd::bind_value(table["low"], p.low, source, at + ".low");
          cd::bind_value(table["high"], p.high, source, at + ".high");
        }
        if (table.contains("log")) cd::bind_value(table["log"], p.log, source, at + ".log");
      }
      try {
        p.validate();
      } catch (const Error& e) {
        rlhf::detail::fail("{}: key '{}': {}", source, at,
                           std::string_view(e.what()).substr(std::string_view("sweep: ").size()));
      }
      params.push_back(std::move(p));
    }
    return SearchSpace(std::move(params));
  }

 private:
  /// Throws rlhf::Error when `point` is not an object or holds a key that is not a parameter.
  void check_point(const Point& point) const {
    if (!point.is_object()) rlhf::detail::fail("sweep: a point must be a JSON object, got {}", point.dump());
    if (point.size() != params_.size()) {
      for (const auto& [key, value] : point.items())
        if (!contains(key))
          rlhf::detail::fail("sweep: point {}: '{}' is not a parameter of the space", point.dump(), key);
    }
  }
  /// The value of `p` in `point`; throws rlhf::Error when it is missing.
  static const nlohmann::json& value_of(const Point& point, const Param& p) {
    const auto it = point.find(p.name);
    if (it == point.end()) rlhf::detail::fail("sweep: point {}: parameter '{}' is missing", point.dump(), p.name);
    return *it;
  }
  void check_size(size_t n) const {
    if (n != params_.size())
      rlhf::detail::fail("sweep: expected {} unit coordinates (one per parameter), got {}", params_.size(), n);
  }

  std::vector<Param> params_;
};

/// `config` with every parameter of `point` set at its dotted key (tables on the way are created), e.g.
/// {"ppo": {"kl_coef": 0.05}} from {"ppo.kl_coef": 0.05}.
inline nlohmann::json apply_point(nlohmann::json config, const Point& point) {
  for (const auto& [key, value] : point.items())
    rlhf::config::apply_override(config, fmt::format("{}={}", key, value.dump()));
  return config;
}

}  // namespace rlhf::sweep
