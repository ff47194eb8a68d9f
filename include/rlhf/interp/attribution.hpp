#pragma once
/// @file Attribution of training data to parameters and neurons from a ShiftStore: which MLP neuron an element of
/// a recorded weight belongs to, per-neuron aggregation of the kept shifts, the token distributions of the data
/// attributed to a neuron, and the univariate token selection heuristic of the transparency experiments.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/interp/shift_store.hpp>

namespace rlhf {

// ---- neurons ----

/// Hidden unit `neuron` of block `layer`'s MLP (0 <= neuron < d_mlp).
struct NeuronId {
  int64_t layer = 0;   ///< block index, e.g. 2
  int64_t neuron = 0;  ///< hidden unit, e.g. 96
  auto operator<=>(const NeuronId&) const = default;
};

/// The MLP neuron that owns element `idx` (row-major flat index) of a recorded tensor of kind `kind` ("weight",
/// "bias", "lora_A" or "lora_B"), or nothing for an element that belongs to no neuron. A neuron n of a GPT-2 MLP owns
/// column n of the input projection c_fc (weight [D, d_mlp]: elements i * d_mlp + n) and its bias element n, and
/// row n of the output projection c_proj (weight [d_mlp, D]: elements n * D + o). In torch.nn.Linear's [out, in]
/// layout these are row n of linear1 and column n of linear2. Of LoRA adapters it owns row n of c_fc's lora_B
/// ([d_mlp, r]) and column n of c_proj's lora_A ([r, d_mlp]); the other factors act on the residual stream. `cols`
/// is the tensor's last dimension (d_mlp for c_fc, D for c_proj, r for lora_B). Attention projections and the
/// output projection's bias (a residual-stream vector) belong to no neuron.
inline std::optional<int64_t> neuron_of(LinearRole role, std::string_view kind, int64_t cols, int64_t idx) {
  if (role == LinearRole::mlp_in) {
    if (kind == "weight") return idx % cols;
    if (kind == "bias") return idx;
    if (kind == "lora_B") return idx / cols;
  }
  if (role == LinearRole::mlp_out) {
    if (kind == "weight") return idx / cols;
    if (kind == "lora_A") return idx % cols;
  }
  return std::nullopt;
}

/// The attention head that owns element `idx` of a recorded attention tensor of kind `kind` (GPT-2 layout), or
/// nothing: in c_attn ([D, 3D], columns q | k | v; its bias [3D] likewise) column o belongs to head (o mod D) /
/// d_head; in c_proj ([D, D]) row i belongs to head i / d_head. `cols` is the tensor's last dimension, `n_head` the
/// heads per layer. LoRA factors (a low-rank basis shared by the heads) and c_proj's bias belong to no head.
inline std::optional<int64_t> head_of(LinearRole role, std::string_view kind, int64_t cols, int64_t idx,
                                      int64_t n_head) {
  if (role == LinearRole::attn_qkv && (kind == "weight" || kind == "bias")) {
    const int64_t d = cols / 3;
    return (idx % cols % d) / (d / n_head);
  }
  if (role == LinearRole::attn_out && kind == "weight") return (idx / cols) / (cols / n_head);
  return std::nullopt;
}

/// Kept shifts aggregated over one neuron's weights.
struct NeuronSummary {
  NeuronId id;
  int64_t entries = 0;    ///< kept shift rows on the neuron's weights
  int64_t data = 0;       ///< distinct data among them
  double sum_abs = 0;     ///< sum of |diff|
};

// ---- token selection ----

/// Parameters of the univariate token selection heuristic.
struct TokenSelectionOptions {
  int64_t min_count = 20;     ///< c: a token must occur at least c times in the attributed data, e.g. 20
  int64_t top_relative = 20;  ///< r: keep the r tokens with the highest relative frequency, e.g. 20
  int64_t top_count = 10;     ///< s: of those, keep the s with the highest count, e.g. 10
};

/// One token's statistics in an attributed sample against the corpus.
struct TokenScore {
  int64_t token = 0;
  int64_t count = 0;         ///< occurrences in the attributed data
  double freq = 0;           ///< count / all attributed tokens
  double corpus_freq = 0;    ///< corpus occurrences / all corpus tokens
  double relative = 0;       ///< freq / corpus_freq
};

/// The univariate token selection heuristic: among the tokens occurring at least `min_count` times in the
/// attributed data (`attributed`: token -> count), the `top_relative` with the highest relative frequency
/// (attributed frequency over corpus frequency, `corpus`: token -> count), of which the `top_count` with the
/// highest count, returned by count (ties: by relative frequency, then token id). Tokens absent from the corpus are
/// skipped (the attributed data must come from it).
inline std::vector<TokenScore> select_tokens(const std::map<int64_t, int64_t>& attributed,
                                             const std::map<int64_t, int64_t>& corpus,
                                             const TokenSelectionOptions& options = {}) {
  double total = 0, corpus_total = 0;
  for (const auto& [token, n] : attributed) total += static_cast<double>(n);
  for (const auto& [token, n] : corpus) corpus_total += static_cast<double>(n);
  std::vector<TokenScore> scores;
  if (total == 0 || corpus_total == 0) return scores;
  for (const auto& [token, n] : attributed) {
    auto it = corpus.find(token);
    if (n < options.min_count || it == corpus.end() || it->second == 0) continue;
    TokenScore s{token, n, static_cast<double>(n) / total, static_cast<double>(it->second) / corpus_total, 0};
    s.relative = s.freq / s.corpus_freq;
    scores.push_back(s);
  }
  std::sort(scores.begin(), scores.end(), [](const TokenScore& a, const TokenScore& b) {
    return a.relative != b.relative ? a.relative > b.relative : a.token < b.token;
  });
  if (static_cast<int64_t>(scores.size()) > options.top_relative) scores.resize(options.top_relative);
  std::stable_sort(scores.begin(), scores.end(),
                   [](const TokenScore& a, const TokenScore& b) { return a.count > b.count; });
  if (static_cast<int64_t>(scores.size()) > options.top_count) scores.resize(options.top_count);
  return scores;
}

// ---- reading a store ----

/// Read access to a ShiftStore file for analysis (the SQL it runs is in docs/transparency.md).
class ShiftDatabase {
 public:
  /// Opens `path` for queries (it may still be written by a ShiftStore in the same or another process).
  explicit ShiftDatabase(const std::filesystem::path& path) : db_(check_exists(path), false, /*read_only=*/true) {}

  /// Shift rows kept in the store.
  int64_t shift_rows() { return scalar("SELECT count(*) FROM shifts"); }
  /// Steps recorded.
  int64_t steps() { return scalar("SELECT count(*) FROM steps"); }

  /// Per-neuron aggregation over the MLP weights: neurons with at least `min_entries` kept shifts, most first.
  std::vector<NeuronSummary> neuron_summary(int64_t min_entries = 1) {
    detail::SqliteStatement s(db_, "SELECT layer, neuron, count(*) AS n, count(DISTINCT datum), sum(abs(diff)) "
                                   "FROM neuron_shifts GROUP BY layer, neuron HAVING n >= ? "
                                   "ORDER BY n DESC, layer, neuron");
    s.bind(1, min_entries);
    std::vector<NeuronSummary> out;
    while (s.step()) out.push_back({{s.integer(0), s.integer(1)}, s.integer(2), s.integer(3), s.real(4)});
    return out;
  }

  /// The data attributed to `neuron`: datum id -> number of steps in which a kept shift of the datum touched one
  /// of the neuron's weights (data recur across epochs, so this counts with multiplicity).
  std::map<int64_t, int64_t> attributed_data(const NeuronId& neuron) {
    detail::SqliteStatement s(db_, "SELECT datum, count(*) FROM (SELECT DISTINCT epoch, step, datum FROM "
                                   "neuron_shifts WHERE layer = ? AND neuron = ?) GROUP BY datum");
    s.bind(1, neuron.layer).bind(2, neuron.neuron);
    std::map<int64_t, int64_t> out;
    while (s.step()) out[s.integer(0)] = s.integer(1);
    return out;
  }

  /// The token ids of datum `datum`.
  std::vector<int64_t> tokens(int64_t datum) {
    detail::SqliteStatement s(db_, "SELECT tokens FROM data WHERE datum = ?");
    s.bind(1, datum);
    if (!s.step()) detail::fail("shift store: {}: no datum {}", db_.path(), datum);
    return detail::split_tokens(s.text(0));
  }

  /// Token counts of `data` (datum id -> multiplicity), each datum counted with its multiplicity.
  std::map<int64_t, int64_t> token_counts(const std::map<int64_t, int64_t>& data) {
    std::map<int64_t, int64_t> out;
    for (const auto& [datum, times] : data)
      for (int64_t token : tokens(datum)) out[token] += times;
    return out;
  }

  /// Token counts of everything trained on while recording (each step's data, with repetition across steps).
  std::map<int64_t, int64_t> corpus_token_counts() {
    detail::SqliteStatement s(db_, "SELECT d.tokens, count(*) FROM batches b JOIN data d ON d.datum = b.datum "
                                   "GROUP BY b.datum");
    std::map<int64_t, int64_t> out;
    while (s.step()) {
      const int64_t times = s.integer(1);
      for (int64_t token : detail::split_tokens(s.text(0))) out[token] += times;
    }
    return out;
  }

  /// The token heuristic on the data attributed to `neuron` against corpus_token_counts().
  std::vector<TokenScore> notable_tokens(const NeuronId& neuron, const TokenSelectionOptions& options = {}) {
    return select_tokens(token_counts(attributed_data(neuron)), corpus_token_counts(), options);
  }

  /// The underlying connection, for queries of your own.
  detail::SqliteDb& db() { return db_; }

 private:
  static const std::filesystem::path& check_exists(const std::filesystem::path& path) {
    if (!std::filesystem::exists(path)) detail::fail("shift store: {}: no such file", path.string());
    return path;
  }
  int64_t scalar(const std::string& sql) {
    detail::SqliteStatement s(db_, sql);
    s.step();
    return s.integer(0);
  }
  detail::SqliteDb db_;
};

}  // namespace rlhf
