#pragma once
/// @file Checks of an attribution: zero-weight ablation of MLP neurons, the prediction-flip table over a set of
/// contexts, the same flip statistics for random neurons and random contexts (a ratio with a bootstrap confidence
/// interval), activation statistics, and bigram-shift tracking of the tied embedding.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <rlhf/detail/error.hpp>
#include <rlhf/interp/attribution.hpp>
#include <rlhf/interp/capture.hpp>
#include <rlhf/interp/shift_recorder.hpp>
#include <rlhf/train/step_callback.hpp>

namespace rlhf {

// ---- ablation ----

namespace detail {

/// The c_fc and c_proj layers of block `layer`'s MLP in `model`.
inline std::pair<std::shared_ptr<Conv1DImpl>, std::shared_ptr<Conv1DImpl>> mlp_layers(torch::nn::Module& model,
                                                                                       int64_t layer) {
  std::shared_ptr<Conv1DImpl> in, out;
  for (auto& unit : find_linear_units(model, Targets::MLP)) {
    if (unit.layer != layer) continue;
    (unit.role == LinearRole::mlp_in ? in : out) = unit.module;
  }
  if (!in || !out)
    fail("ablation: the model has no Conv1D MLP (mlp.c_fc, mlp.c_proj) in block {} ---> HINT: blocks count from 0; "
         "LoRA layers are not supported",
         layer);
  return {in, out};
}

}  // namespace detail

/// RAII zero-weight ablation of MLP neurons: while alive, each neuron's weights are zero (its column of c_fc, its
/// bias element in c_fc and its row of c_proj), so the neuron contributes nothing to the residual stream; the
/// destructor restores the weights exactly.
class NeuronAblation {
 public:
  NeuronAblation(torch::nn::Module& model, std::vector<NeuronId> neurons) {
    torch::NoGradGuard no_grad;
    for (const auto& n : neurons) {
      auto [in, out] = detail::mlp_layers(model, n.layer);
      if (n.neuron < 0 || n.neuron >= in->out_features())
        detail::fail("NeuronAblation: neuron {} of block {} is outside [0, {})", n.neuron, n.layer,
                     in->out_features());
      saved_.push_back({in, out, n.neuron, in->weight.select(1, n.neuron).clone(), in->bias[n.neuron].clone(),
                        out->weight.select(0, n.neuron).clone()});
      in->weight.select(1, n.neuron).zero_();
      in->bias[n.neuron].zero_();
      out->weight.select(0, n.neuron).zero_();
    }
  }
  NeuronAblation(torch::nn::Module& model, NeuronId neuron) : NeuronAblation(model, std::vector<NeuronId>{neuron}) {}
  ~NeuronAblation() {
    torch::NoGradGuard no_grad;
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      it->in->weight.select(1, it->neuron).copy_(it->in_column);
      it->in->bias[it->neuron].copy_(it->in_bias);
      it->out->weight.select(0, it->neuron).copy_(it->out_row);
    }
  }
  NeuronAblation(const NeuronAblation&) = delete;
  NeuronAblation& operator=(const NeuronAblation&) = delete;

 private:
  struct Saved {
    std::shared_ptr<Conv1DImpl> in, out;
    int64_t neuron;
    torch::Tensor in_column, in_bias, out_row;
  };
  std::vector<Saved> saved_;
};

// ---- prediction flips ----

/// One token's row of a flip table.
struct FlipRow {
  int64_t token = 0;
  double proportion = 0;   ///< flips / instances
  int64_t flips = 0;       ///< positions whose prediction changed to or from the token
  int64_t instances = 0;   ///< positions predicting the token before or after the ablation
  bool notable = false;    ///< the token is among the attribution's notable tokens
};

/// Prediction flips of an ablation over a set of contexts.
struct FlipTable {
  std::vector<FlipRow> rows;  ///< by proportion, then flips, descending
  int64_t positions = 0;      ///< positions compared
  int64_t flips = 0;          ///< positions whose greedy prediction changed
  torch::Tensor row_flips;    ///< [N] flips per context (int64)
  torch::Tensor row_positions;  ///< [N] positions per context (int64)
  double flip_rate() const { return positions > 0 ? static_cast<double>(flips) / static_cast<double>(positions) : 0.0; }
};

namespace detail {

/// Greedy next-token predictions [N, T] of `model` on `ids` [N, T] (mask [N, T]), `batch` rows at a time.
template <class Model>
torch::Tensor greedy_predictions(Model& model, const torch::Tensor& ids, const torch::Tensor& mask, int64_t batch) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out;
  for (int64_t begin = 0; begin < ids.size(0); begin += batch) {
    const int64_t n = std::min(batch, ids.size(0) - begin);
    auto hidden = model.forward(ids.narrow(0, begin, n), mask.narrow(0, begin, n));  // [n, T, D]
    out.push_back(model.logits(hidden).argmax(-1).cpu());                             // [n, T]
  }
  return torch::cat(out);
}

}  // namespace detail

/// Zero-weight ablates `neurons` of `model` (a GPT2Impl or any module with forward(ids, mask) and logits(hidden)
/// and GPT-2 MLP layers) and compares its greedy next-token predictions on `ids` [N, T] (`mask` [N, T], nonzero =
/// real token) with the unablated model's, at every real position. A token's instances are the positions
/// predicting it before or after the ablation, its flips those among them whose prediction changed. `notable`
/// marks rows (e.g. the tokens the attribution selected). The model is evaluated as it is (call eval() first).
template <class Model>
FlipTable prediction_flips(Model& model, const torch::Tensor& ids, const torch::Tensor& mask,
                           const std::vector<NeuronId>& neurons, const std::set<int64_t>& notable = {},
                           int64_t batch = 32) {
  if (ids.dim() != 2 || mask.sizes() != ids.sizes())
    detail::fail("prediction_flips: ids and mask must be [N, T] of one shape, got {} and {}",
                 detail::format_shape(ids.sizes()), detail::format_shape(mask.sizes()));
  torch::Tensor before = detail::greedy_predictions(model, ids, mask, batch);  // [N, T]
  torch::Tensor after;
  {
    NeuronAblation ablation(model, neurons);
    after = detail::greedy_predictions(model, ids, mask, batch);
  }
  auto real = mask.cpu().ne(0);                                   // [N, T]
  auto changed = before.ne(after).logical_and(real);              // [N, T]
  FlipTable table;
  table.row_flips = changed.sum(1).to(torch::kLong);
  table.row_positions = real.sum(1).to(torch::kLong);
  table.positions = table.row_positions.sum().item<int64_t>();
  table.flips = table.row_flips.sum().item<int64_t>();
  std::map<int64_t, std::pair<int64_t, int64_t>> counts;  // token -> (flips, instances)
  torch::Tensor b = before.masked_select(real).contiguous(), a = after.masked_select(real).contiguous();
  const auto* bp = b.data_ptr<int64_t>();
  const auto* ap = a.data_ptr<int64_t>();
  for (int64_t i = 0; i < b.numel(); ++i) {
    const bool flip = bp[i] != ap[i];
    counts[bp[i]].second += 1;
    counts[bp[i]].first += flip;
    if (flip) {
      counts[ap[i]].second += 1;
      counts[ap[i]].first += 1;
    }
  }
  for (const auto& [token, c] : counts) {
    if (c.first == 0) continue;
    table.rows.push_back({token, static_cast<double>(c.first) / static_cast<double>(c.second), c.first, c.second,
                          notable.contains(token)});
  }
  std::sort(table.rows.begin(), table.rows.end(), [](const FlipRow& x, const FlipRow& y) {
    if (x.proportion != y.proportion) return x.proportion > y.proportion;
    if (x.flips != y.flips) return x.flips > y.flips;
    return x.token < y.token;
  });
  return table;
}

/// As above for one neuron.
template <class Model>
FlipTable prediction_flips(Model& model, const torch::Tensor& ids, const torch::Tensor& mask, NeuronId neuron,
                           const std::set<int64_t>& notable = {}, int64_t batch = 32) {
  return prediction_flips(model, ids, mask, std::vector<NeuronId>{neuron}, notable, batch);
}

// ---- comparisons with random neurons and random contexts ----

/// A ratio of flip rates with a bootstrap confidence interval.
struct FlipRatio {
  double rate = 0;           ///< flips per position of the tested case
  double baseline_rate = 0;  ///< flips per position of the baseline
  double ratio = 0;          ///< rate / baseline_rate (infinite when the baseline never flips)
  double ci_low = 0;         ///< lower end of the bootstrap interval of the ratio
  double ci_high = 0;        ///< upper end
};

/// rate(a) / rate(b) for per-context flip and position counts (a_flips, a_positions [N_a]; b_* [N_b]), with a
/// percentile bootstrap interval at `level` (each resample draws the contexts of a and of b with replacement).
inline FlipRatio flip_ratio(const torch::Tensor& a_flips, const torch::Tensor& a_positions,
                            const torch::Tensor& b_flips, const torch::Tensor& b_positions, int64_t resamples = 1000,
                            double level = 0.95, uint64_t seed = 1) {
  auto to_vec = [](const torch::Tensor& t) {
    auto c = t.to(torch::kCPU, torch::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  };
  const auto af = to_vec(a_flips), ap = to_vec(a_positions), bf = to_vec(b_flips), bp = to_vec(b_positions);
  if (af.empty() || bf.empty() || af.size() != ap.size() || bf.size() != bp.size())
    detail::fail("flip_ratio: need nonempty per-context counts of matching lengths, got {}/{} and {}/{}", af.size(),
                 ap.size(), bf.size(), bp.size());
  auto rate = [](const std::vector<double>& f, const std::vector<double>& p, const std::vector<size_t>* pick) {
    double flips = 0, positions = 0;
    const size_t n = pick ? pick->size() : f.size();
    for (size_t i = 0; i < n; ++i) {
      const size_t j = pick ? (*pick)[i] : i;
      flips += f[j];
      positions += p[j];
    }
    return positions > 0 ? flips / positions : 0.0;
  };
  auto ratio = [](double x, double y) { return y > 0 ? x / y : std::numeric_limits<double>::infinity(); };
  FlipRatio out;
  out.rate = rate(af, ap, nullptr);
  out.baseline_rate = rate(bf, bp, nullptr);
  out.ratio = ratio(out.rate, out.baseline_rate);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick_a(0, af.size() - 1), pick_b(0, bf.size() - 1);
  std::vector<double> ratios;
  std::vector<size_t> ia(af.size()), ib(bf.size());
  for (int64_t r = 0; r < resamples; ++r) {
    for (auto& i : ia) i = pick_a(rng);
    for (auto& i : ib) i = pick_b(rng);
    ratios.push_back(ratio(rate(af, ap, &ia), rate(bf, bp, &ib)));
  }
  std::sort(ratios.begin(), ratios.end());
  if (!ratios.empty()) {
    const double tail = (1 - level) / 2;
    auto at = [&](double q) {
      return ratios[std::min(ratios.size() - 1, static_cast<size_t>(q * static_cast<double>(ratios.size())))];
    };
    out.ci_low = at(tail);
    out.ci_high = at(1 - tail);
  }
  return out;
}

/// Flip rate of `neuron` on the contexts `ids`/`mask` against `count` other neurons of the same layer drawn at
/// random (seeded), on the same contexts: is this neuron special for these data?
template <class Model>
FlipRatio compare_with_random_neurons(Model& model, const torch::Tensor& ids, const torch::Tensor& mask,
                                      NeuronId neuron, int64_t count = 10, uint64_t seed = 1,
                                      int64_t resamples = 1000) {
  const int64_t width = detail::mlp_layers(model, neuron.layer).first->out_features();
  if (width < 2) detail::fail("compare_with_random_neurons: the layer has a single neuron");
  auto target = prediction_flips(model, ids, mask, neuron);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> draw(0, width - 2);
  std::vector<torch::Tensor> flips, positions;
  for (int64_t i = 0; i < count; ++i) {
    int64_t other = draw(rng);
    if (other >= neuron.neuron) ++other;  // any neuron but the tested one
    auto table = prediction_flips(model, ids, mask, NeuronId{neuron.layer, other});
    flips.push_back(table.row_flips);
    positions.push_back(table.row_positions);
  }
  return flip_ratio(target.row_flips, target.row_positions, torch::cat(flips), torch::cat(positions), resamples, 0.95,
                    seed);
}

/// Flip rate of `neuron` on its attributed contexts against the same neuron on `random_ids`/`random_mask`
/// (contexts drawn at random from the corpus): are these data special for this neuron?
template <class Model>
FlipRatio compare_with_random_contexts(Model& model, const torch::Tensor& ids, const torch::Tensor& mask,
                                       const torch::Tensor& random_ids, const torch::Tensor& random_mask,
                                       NeuronId neuron, uint64_t seed = 1, int64_t resamples = 1000) {
  auto target = prediction_flips(model, ids, mask, neuron);
  auto baseline = prediction_flips(model, random_ids, random_mask, neuron);
  return flip_ratio(target.row_flips, target.row_positions, baseline.row_flips, baseline.row_positions, resamples,
                    0.95, seed);
}

// ---- activation statistics ----

/// Activations of one MLP layer's neurons over a set of contexts.
struct ActivationStats {
  torch::Tensor mean;   ///< [d_mlp] mean activation over the selected positions
  torch::Tensor min;    ///< [d_mlp]
  torch::Tensor max;    ///< [d_mlp]
  int64_t positions = 0;  ///< positions averaged
};

/// Statistics of block `layer`'s MLP neuron activations (the input of mlp.c_proj, after the nonlinearity) over the
/// real positions of `ids`/`mask` whose input token is `token` (or every real position for token < 0): to compare
/// the neurons an attribution found with the ones activations alone would single out.
template <class Model>
ActivationStats activation_stats(Model& model, const torch::Tensor& ids, const torch::Tensor& mask, int64_t layer,
                                 int64_t token = -1, int64_t batch = 32) {
  auto [in, out] = detail::mlp_layers(model, layer);
  std::vector<torch::Tensor> selected;
  {
    LinearInputCapture capture(out);
    torch::NoGradGuard no_grad;
    for (int64_t begin = 0; begin < ids.size(0); begin += batch) {
      const int64_t n = std::min(batch, ids.size(0) - begin);
      capture.inputs.clear();
      model.forward(ids.narrow(0, begin, n), mask.narrow(0, begin, n));
      auto acts = capture.inputs.at(0).to(torch::kCPU, torch::kFloat);  // [n, T, d_mlp]
      auto rows_ids = ids.narrow(0, begin, n).cpu();
      auto keep = mask.narrow(0, begin, n).cpu().ne(0);
      if (token >= 0) keep = keep.logical_and(rows_ids.eq(token));
      selected.push_back(acts.index({keep}));  // [m, d_mlp]
    }
  }
  auto all = torch::cat(selected);  // [M, d_mlp]
  ActivationStats s;
  s.positions = all.size(0);
  if (s.positions == 0) {
    s.mean = s.min = s.max = torch::zeros({in->out_features()});
    return s;
  }
  s.mean = all.mean(0);
  s.min = std::get<0>(all.min(0));
  s.max = std::get<0>(all.max(0));
  return s;
}

// ---- bigram shifts ----

/// One entry of the change of the direct-path bigram table.
struct BigramShift {
  int64_t prev = 0;  ///< the current token
  int64_t next = 0;  ///< the predicted next token
  double diff = 0;   ///< change of the logit of `next` after `prev` through the direct path
};

/// The `k` largest changes |delta B| of the zero-layer ("direct path") bigram logits B = W_E W_U when the embedding
/// goes from `embed_before` to `embed_after` ([V, D]) and the unembedding from `unembed_before` to `unembed_after`
/// ([D, V]; undefined = tied to the embedding, U = E^T as in GPT-2). delta B = E' U' - E U needs the weights, not
/// only their updates. The final layernorm between them is ignored (the zero-layer approximation of Elhage et al.
/// 2021, "A Mathematical Framework for Transformer Circuits"). Computed `chunk` rows at a time, so memory is
/// chunk x V, not V x V.
inline std::vector<BigramShift> bigram_shifts(const torch::Tensor& embed_before, const torch::Tensor& embed_after,
                                              int64_t k, torch::Tensor unembed_before = {},
                                              torch::Tensor unembed_after = {}, int64_t chunk = 1024) {
  torch::NoGradGuard no_grad;
  auto e0 = embed_before.detach().to(torch::kFloat), e1 = embed_after.detach().to(torch::kFloat);
  auto u0 = unembed_before.defined() ? unembed_before.detach().to(torch::kFloat) : e0.t();
  auto u1 = unembed_after.defined() ? unembed_after.detach().to(torch::kFloat) : e1.t();
  const int64_t v = e0.size(0), cols = u0.size(1);
  torch::Tensor values, rows, idx;
  for (int64_t begin = 0; begin < v; begin += chunk) {
    const int64_t n = std::min(chunk, v - begin);
    auto delta = torch::mm(e1.narrow(0, begin, n), u1) - torch::mm(e0.narrow(0, begin, n), u0);  // [n, V]
    auto flat = delta.reshape({-1});
    auto picked = std::get<1>(flat.abs().topk(std::min<int64_t>(k, flat.numel())));
    auto vals = flat.index_select(0, picked);
    auto r = picked.div(cols, "floor").add_(begin), c = picked.remainder(cols);
    values = values.defined() ? torch::cat({values, vals}) : vals;
    rows = rows.defined() ? torch::cat({rows, r}) : r;
    idx = idx.defined() ? torch::cat({idx, c}) : c;
  }
  auto keep = std::get<1>(values.abs().topk(std::min<int64_t>(k, values.numel())));  // sorted, largest first
  std::vector<BigramShift> out;
  for (int64_t i = 0; i < keep.numel(); ++i) {
    const int64_t j = keep[i].item<int64_t>();
    out.push_back({rows[j].item<int64_t>(), idx[j].item<int64_t>(), values[j].item<double>()});
  }
  return out;
}

/// A step callback that tracks the direct-path bigram shifts of each step: it keeps the embedding before the step
/// (the full weights are needed, not only the update) and, after the step, the `k` largest changes.
class BigramShiftTracker : public StepCallback {
 public:
  /// Tracks `embedding` ([V, D], e.g. model->transformer->wte->weight; tied unembedding).
  BigramShiftTracker(torch::Tensor embedding, int64_t k = 20) : embedding_(std::move(embedding)), k_(k) {}

  void on_gradients(const StepInfo& /*info*/) override { before_ = embedding_.detach().clone(); }
  void on_step_end(const StepInfo& info) override {
    if (!before_.defined()) return;
    history_.push_back({info.step, bigram_shifts(before_, embedding_, k_)});
    before_ = torch::Tensor();
  }

  /// (step, its top-k bigram shifts) for every tracked step.
  const std::vector<std::pair<int64_t, std::vector<BigramShift>>>& history() const { return history_; }

 private:
  torch::Tensor embedding_;
  int64_t k_;
  torch::Tensor before_;
  std::vector<std::pair<int64_t, std::vector<BigramShift>>> history_;
};

}  // namespace rlhf
