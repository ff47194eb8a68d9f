// Training-process transparency, the experiment of "Training Process Transparency through Gradient
// Interpretability" (robertzk and evhub, 2023) in one command: trains its small transformer language model with
// SGD while an rlhf::ShiftRecorder writes every step's largest per-datum parameter shifts to SQLite, then attributes
// training tokens to MLP neurons and checks the attribution by zero-weight ablation.
//
//   rlhf_transparency                                  # data/reviews.txt, about a minute on 2 idle cores
//   rlhf_transparency --wikitext ~/data/wikitext-2-raw --epochs 5 --max-steps 0
//
// Model and training as in the post: 3 layers, 4 heads, width 200, MLP 200, context 35, batch 20, dropout 0.2,
// sinusoidal positions, token embeddings x sqrt(width) (the tutorial model's `encoder(src) * sqrt(d_model)`),
// uniform initialisation in [-0.1, 0.1], cross-entropy, SGD at lr 5.0 with a step schedule and gradient clipping at
// 0.5, a word-level lowercase tokenizer (torchtext's basic_english).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <rlhf/rlhf.hpp>

namespace {

namespace fs = std::filesystem;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---- corpus ----

/// torchtext's basic_english: lowercase, punctuation split off as tokens, whitespace-separated words.
std::vector<std::string> basic_english(const std::string& line) {
  std::string spaced;
  for (char c : line) {
    const char lower = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (std::string_view(".,!?;:()'").find(lower) != std::string_view::npos) {
      spaced += ' ';
      spaced += lower;
      spaced += ' ';
    } else if (lower == '"') {
      spaced += ' ';
    } else {
      spaced += lower;
    }
  }
  std::vector<std::string> out;
  std::string word;
  for (char c : spaced) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      if (!word.empty()) out.push_back(std::move(word)), word.clear();
    } else {
      word += c;
    }
  }
  if (!word.empty()) out.push_back(std::move(word));
  return out;
}

/// The tokens of every line of `path`, in order.
std::vector<std::string> read_tokens(const fs::path& path) {
  std::ifstream in(path);
  if (!in) rlhf::detail::fail("transparency: {}: cannot open", path.string());
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line))
    for (auto& t : basic_english(line)) out.push_back(std::move(t));
  return out;
}

/// Word <-> id; id 0 is <unk>.
struct Vocab {
  std::vector<std::string> words{"<unk>"};
  std::unordered_map<std::string, int64_t> ids{{"<unk>", 0}};

  int64_t add(const std::string& w) {
    auto [it, fresh] = ids.emplace(w, static_cast<int64_t>(words.size()));
    if (fresh) words.push_back(w);
    return it->second;
  }
  int64_t id(const std::string& w) const {
    auto it = ids.find(w);
    return it == ids.end() ? 0 : it->second;
  }
  const std::string& word(int64_t id) const { return words.at(static_cast<size_t>(id)); }
};

/// The training and validation token streams.
struct Corpus {
  Vocab vocab;
  torch::Tensor train, valid;  // [N] int64
  std::string name;
};

torch::Tensor encode(const Vocab& vocab, const std::vector<std::string>& tokens) {
  std::vector<int64_t> ids;
  ids.reserve(tokens.size());
  for (const auto& t : tokens) ids.push_back(vocab.id(t));
  return torch::tensor(ids, torch::kLong);
}

/// WikiText-2 raw files (wiki.train.raw, wiki.valid.raw) in `dir`, or a text file split 90% / 10% by lines.
Corpus load_corpus(const std::string& wikitext, const std::string& text) {
  Corpus c;
  std::vector<std::string> train, valid;
  if (!wikitext.empty()) {
    train = read_tokens(fs::path(wikitext) / "wiki.train.raw");
    valid = read_tokens(fs::path(wikitext) / "wiki.valid.raw");
    c.name = "WikiText-2 (" + wikitext + ")";
  } else {
    std::ifstream in(text);
    if (!in) rlhf::detail::fail("transparency: {}: cannot open ---> HINT: run from the repository root, or pass "
                                "--corpus FILE or --wikitext DIR", text);
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    const size_t cut = lines.size() - lines.size() / 10;
    for (size_t i = 0; i < lines.size(); ++i)
      for (auto& t : basic_english(lines[i])) (i < cut ? train : valid).push_back(std::move(t));
    c.name = text;
  }
  for (const auto& t : train) c.vocab.add(t);
  c.train = encode(c.vocab, train);
  c.valid = encode(c.vocab, valid);
  return c;
}

/// The stream cut into `batch` contiguous columns (PyTorch's batchify): [batch, N / batch].
torch::Tensor batchify(const torch::Tensor& stream, int64_t batch) {
  const int64_t n = stream.size(0) / batch;
  return stream.narrow(0, 0, n * batch).view({batch, n});
}

/// Training step `i`'s data: from each column, the 36-token window starting at i x 35 (35 inputs, 35 targets),
/// as the post's get_batch does. [B, T + 1].
torch::Tensor window(const torch::Tensor& columns, int64_t i, int64_t t) {
  const int64_t start = i * t;
  const int64_t len = std::min(t + 1, columns.size(1) - start);
  return columns.narrow(1, start, len).contiguous();
}

// ---- training ----

struct Args {
  std::string corpus = "data/reviews.txt", wikitext, out = "transparency-out";
  int64_t epochs = 2, max_steps = 400, batch = 20, context = 35, layers = 3, heads = 4, width = 200, hidden = 200;
  std::optional<double> embedding_scale;  // unset: sqrt(width)
  double dropout = 0.2, lr = 5.0, lr_gamma = 0.95, plateau_div = 4.0, clip = 0.5, init = 0.1;
  double top_fraction = 0.0013;
  std::string units = "all";
  bool record_layernorms = false;
  bool record_embeddings = false;
  int64_t neurons = 3, contexts = 300, random_neurons = 10, flip_rows = 8, seed = 1;
  rlhf::TokenSelectionOptions heuristic;
  int threads = 0;
};

/// Mean next-token cross-entropy of `columns` (evaluation mode, no dropout).
double evaluate(rlhf::GPT2<>& model, const torch::Tensor& columns, int64_t t) {
  torch::NoGradGuard no_grad;
  model->eval();
  double sum = 0;
  int64_t n = 0;
  for (int64_t i = 0; (i + 1) * t < columns.size(1); ++i) {
    auto ids = window(columns, i, t);
    const int64_t len = ids.size(1) - 1;
    auto logits = model->logits(model->forward(ids.narrow(1, 0, len)));  // [B, len, V]
    sum += torch::nn::functional::cross_entropy(
               logits.reshape({-1, logits.size(-1)}), ids.narrow(1, 1, len).reshape({-1}),
               torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
               .item<double>();
    n += ids.size(0) * len;
  }
  model->train();
  return n > 0 ? sum / static_cast<double>(n) : 0.0;
}

/// Cross-entropy (nats per token) of `valid` under the word frequencies of `train`, add-one smoothed: the best a
/// model that ignores the context can do, so the validation loss must go below it before the model uses the context.
double unigram_cross_entropy(const torch::Tensor& train, const torch::Tensor& valid, int64_t vocab) {
  auto counts = torch::bincount(train, {}, vocab).to(torch::kDouble) + 1.0;  // [V]
  auto log_p = (counts / counts.sum()).log();
  return -log_p.index_select(0, valid).mean().item<double>();
}

/// Trains `model` with SGD, calling `recorder` around each step as a trainer calls its step callbacks.
void train(rlhf::GPT2<>& model, const Corpus& corpus, const Args& a, rlhf::ShiftRecorder& recorder) {
  std::vector<torch::Tensor> params;
  for (auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(a.lr));
  auto train_columns = batchify(corpus.train, a.batch);
  auto valid_columns = batchify(corpus.valid, 10);
  const int64_t per_epoch = (train_columns.size(1) - 1) / a.context;
  fmt::print("training: {} steps per epoch of {} x {} tokens, {} epochs{}\n", per_epoch, a.batch, a.context, a.epochs,
             a.max_steps > 0 ? fmt::format(", at most {} steps", a.max_steps) : "");
  const double unigram =
      unigram_cross_entropy(corpus.train, corpus.valid, static_cast<int64_t>(corpus.vocab.words.size()));
  fmt::print(
      "validation baseline: unigram cross-entropy {:.3f} (perplexity {:.1f}), the training set's word "
      "frequencies without context\n",
      unigram, std::exp(unigram));
  double lr = a.lr, best = std::numeric_limits<double>::infinity();
  int64_t step = 0;
  const auto start = std::chrono::steady_clock::now();
  model->train();
  for (int64_t epoch = 0; epoch < a.epochs && (a.max_steps <= 0 || step < a.max_steps); ++epoch) {
    recorder.set_epoch(epoch);
    static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[0].options()).lr(lr);
    double loss_sum = 0;
    int64_t losses = 0;
    for (int64_t i = 0; i < per_epoch && (a.max_steps <= 0 || step < a.max_steps); ++i, ++step) {
      auto ids = window(train_columns, i, a.context);  // [B, T + 1]
      rlhf::StepInfo info{.step = step, .ids = ids, .optimizer = &sgd};
      recorder.on_step_begin(info);
      sgd.zero_grad();
      auto logits = model->logits(model->forward(ids.narrow(1, 0, a.context)));  // [B, T, V]
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                       ids.narrow(1, 1, a.context).reshape({-1}));
      loss.backward();
      const double norm = torch::nn::utils::clip_grad_norm_(params, a.clip);
      info.grad_norm = norm;
      info.clip_coef = rlhf::clip_coefficient(a.clip, norm);
      recorder.on_gradients(info);
      sgd.step();
      recorder.on_step_end(info);
      loss_sum += loss.item<double>();
      ++losses;
      if ((i + 1) % 100 == 0)
        fmt::print("  epoch {} step {:>5}/{}  loss {:.3f}  lr {:.3f}  {:.1f} s\n", epoch, i + 1, per_epoch,
                   loss_sum / static_cast<double>(losses), lr, seconds_since(start));
    }
    const double valid = evaluate(model, valid_columns, a.context);
    fmt::print(
        "epoch {}: train loss {:.3f}, valid loss {:.3f} (perplexity {:.1f}; unigram baseline {:.3f}), lr "
        "{:.3f}\n",
        epoch, loss_sum / static_cast<double>(std::max<int64_t>(losses, 1)), valid, std::exp(valid), unigram, lr);
    // The step schedule: x gamma every epoch (StepLR), and / plateau_div when validation stops improving.
    if (valid >= best && a.plateau_div > 1) lr /= a.plateau_div;
    best = std::min(best, valid);
    lr *= a.lr_gamma;
  }
  const double recorder_seconds = recorder.stats().seconds;
  const double total = seconds_since(start);
  fmt::print("trained {} steps in {:.1f} s, of which {:.1f} s ({:.0f}%) in the recorder\n", step, total,
             recorder_seconds, 100.0 * recorder_seconds / total);
}

// ---- the attributed-neuron report ----

/// Rows [N, T] of the data `datums` (their first `t` tokens; shorter data are dropped).
torch::Tensor datum_rows(rlhf::ShiftDatabase& db, const std::vector<int64_t>& datums, int64_t t) {
  std::vector<torch::Tensor> rows;
  for (int64_t d : datums) {
    auto tokens = db.tokens(d);
    if (static_cast<int64_t>(tokens.size()) >= t) rows.push_back(torch::tensor(tokens).narrow(0, 0, t));
  }
  return rows.empty() ? torch::zeros({0, t}, torch::kLong) : torch::stack(rows);
}

/// `n` rows of `t` tokens at random offsets of the training stream.
torch::Tensor random_contexts(const torch::Tensor& stream, int64_t n, int64_t t, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, stream.size(0) - t - 1);
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < n; ++i) rows.push_back(stream.narrow(0, pick(rng), t));
  return torch::stack(rows);
}

std::string ratio_text(const rlhf::FlipRatio& r) {
  if (r.rate == 0 && r.baseline_rate == 0) return "no flips in either (the model predicts too few distinct tokens)";
  return fmt::format("flip rate {:.4f} vs {:.4f}: ratio {:.2f} (95% CI {:.2f} .. {:.2f})", r.rate, r.baseline_rate,
                     r.ratio, r.ci_low, r.ci_high);
}

void report(rlhf::GPT2<>& model, const Corpus& corpus, const Args& a, const fs::path& db_path) {
  rlhf::ShiftDatabase db(db_path);
  model->eval();
  const auto& vocab = corpus.vocab;
  auto summary = db.neuron_summary();
  fmt::print("\n==== attributed neurons ({} shifts kept over {} steps) ====\n", db.shift_rows(), db.steps());
  fmt::print("{:>5} {:>7} {:>9} {:>7} {:>10}\n", "block", "neuron", "shifts", "data", "sum |diff|");
  for (size_t i = 0; i < std::min<size_t>(summary.size(), 10); ++i)
    fmt::print("{:>5} {:>7} {:>9} {:>7} {:>10.4f}\n", summary[i].id.layer, summary[i].id.neuron, summary[i].entries,
               summary[i].data, summary[i].sum_abs);
  const auto corpus_counts = db.corpus_token_counts();
  auto sample = random_contexts(corpus.train, std::max<int64_t>(a.contexts, 200), a.context, a.seed + 7);
  for (size_t n = 0; n < std::min<size_t>(summary.size(), static_cast<size_t>(a.neurons)); ++n) {
    const auto id = summary[n].id;
    fmt::print("\n---- block {} neuron {} (c_fc column {}, c_proj row {}) ----\n", id.layer, id.neuron, id.neuron,
               id.neuron);
    auto attributed = db.attributed_data(id);
    auto notable = rlhf::select_tokens(db.token_counts(attributed), corpus_counts, a.heuristic);
    std::set<int64_t> notable_ids;
    fmt::print("tokens selected by the heuristic (count >= {}, top {} by relative frequency, top {} by count):\n",
               a.heuristic.min_count, a.heuristic.top_relative, a.heuristic.top_count);
    fmt::print("  {:<16} {:>7} {:>10} {:>12} {:>9}\n", "token", "count", "freq", "corpus freq", "relative");
    for (const auto& t : notable) {
      notable_ids.insert(t.token);
      fmt::print("  {:<16} {:>7} {:>10.6f} {:>12.6f} {:>9.3f}\n", vocab.word(t.token), t.count, t.freq,
                 t.corpus_freq, t.relative);
    }
    if (notable.empty()) fmt::print("  (none: lower --min-count for a short run)\n");

    // The attributed contexts, most often attributed first.
    std::vector<std::pair<int64_t, int64_t>> by_times(attributed.begin(), attributed.end());
    std::stable_sort(by_times.begin(), by_times.end(), [](auto& x, auto& y) { return x.second > y.second; });
    std::vector<int64_t> datums;
    for (size_t i = 0; i < std::min<size_t>(by_times.size(), static_cast<size_t>(a.contexts)); ++i)
      datums.push_back(by_times[i].first);
    auto ids = datum_rows(db, datums, a.context);
    if (ids.size(0) == 0) continue;
    auto mask = torch::ones_like(ids);
    auto table = rlhf::prediction_flips(*model, ids, mask, id, notable_ids);
    fmt::print("zero-weight ablation over {} attributed contexts ({} positions): {} predictions flip ({:.2f}%)\n",
               ids.size(0), table.positions, table.flips, 100.0 * table.flip_rate());
    fmt::print("  {:<16} {:>16} {:>11} {:>8}\n", "token", "proportion flips", "count flips", "notable");
    auto print_row = [&](const rlhf::FlipRow& r) {
      fmt::print("  {:<16} {:>16.6f} {:>11} {:>8}\n", vocab.word(r.token), r.proportion, r.flips,
                 r.notable ? "True" : "False");
    };
    for (size_t i = 0; i < std::min<size_t>(table.rows.size(), static_cast<size_t>(a.flip_rows)); ++i)
      print_row(table.rows[i]);
    bool gap = false;
    for (size_t i = static_cast<size_t>(a.flip_rows); i < table.rows.size(); ++i)
      if (table.rows[i].notable) {
        if (!gap) fmt::print("  ...\n"), gap = true;
        print_row(table.rows[i]);
      }
    auto sample_mask = torch::ones_like(sample);
    auto neurons = rlhf::compare_with_random_neurons(*model, ids, mask, id, a.random_neurons, a.seed);
    auto contexts = rlhf::compare_with_random_contexts(*model, ids, mask, sample, sample_mask, id, a.seed);
    fmt::print("chance: against {} random neurons of block {} on these contexts: {}\n", a.random_neurons, id.layer,
               ratio_text(neurons));
    fmt::print("        against {} random contexts of the corpus, same neuron:     {}\n", sample.size(0),
               ratio_text(contexts));

    // Activations alone: where does this neuron rank on the first notable token's positions?
    if (!notable.empty()) {
      const int64_t token = notable.front().token;
      auto stats = rlhf::activation_stats(*model, sample, sample_mask, id.layer, token);
      if (stats.positions == 0) stats = rlhf::activation_stats(*model, ids, mask, id.layer, token);
      if (stats.positions > 0) {
        auto order = std::get<1>(stats.mean.sort(0, /*descending=*/true));  // [d_mlp]
        const int64_t rank = order.eq(id.neuron).nonzero().item<int64_t>();
        fmt::print("activations on '{}' ({} positions): neuron {} has mean {:.4f}, rank {} of {} (0 = highest)\n",
                   vocab.word(token), stats.positions, id.neuron, stats.mean[id.neuron].item<double>(), rank,
                   order.size(0));
        fmt::print("  {:>4} {:>12} {:>10} {:>12} {:>10}\n", "rank", "min neuron", "mean", "max neuron", "mean");
        const int64_t d = order.size(0);
        for (int64_t r = 0; r < std::min<int64_t>(5, d); ++r) {
          const int64_t lo = order[d - 1 - r].item<int64_t>(), hi = order[r].item<int64_t>();
          fmt::print("  {:>4} {:>12} {:>10.4f} {:>12} {:>10.4f}\n", r, fmt::format("B{} N{}", id.layer, lo),
                     stats.mean[lo].item<double>(), fmt::format("B{} N{}", id.layer, hi),
                     stats.mean[hi].item<double>());
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Training-process transparency: record per-datum parameter shifts while training the post's model, "
               "then report the neurons they attribute tokens to"};
  Args a;
  app.add_option("--corpus", a.corpus, "text file, one document per line (90% train, 10% validation)")
      ->capture_default_str();
  app.add_option("--wikitext", a.wikitext, "folder with WikiText-2's wiki.train.raw and wiki.valid.raw");
  app.add_option("--out", a.out, "folder for shifts.db and the trained model")->capture_default_str();
  app.add_option("--epochs", a.epochs)->capture_default_str();
  app.add_option("--max-steps", a.max_steps, "stop after this many steps (0 = all epochs)")->capture_default_str();
  app.add_option("--batch", a.batch)->capture_default_str();
  app.add_option("--context", a.context)->capture_default_str();
  app.add_option("--layers", a.layers)->capture_default_str();
  app.add_option("--heads", a.heads)->capture_default_str();
  app.add_option("--width", a.width)->capture_default_str();
  app.add_option("--hidden", a.hidden, "MLP width")->capture_default_str();
  app.add_option("--embedding-scale", a.embedding_scale,
                 "factor on the token embeddings (default sqrt(--width), as the post's model; 1 = none)");
  app.add_option("--dropout", a.dropout)->capture_default_str();
  app.add_option("--lr", a.lr)->capture_default_str();
  app.add_option("--lr-gamma", a.lr_gamma, "learning rate x this after every epoch")->capture_default_str();
  app.add_option("--plateau-div", a.plateau_div, "learning rate / this when validation loss stops improving (1 = "
                                                 "off)")->capture_default_str();
  app.add_option("--clip", a.clip, "gradient-norm clipping")->capture_default_str();
  app.add_option("--init", a.init, "uniform initialisation bound")->capture_default_str();
  app.add_option("--units", a.units, "recorded layers: all (every linear layer, as the post) or mlp")
      ->check(CLI::IsMember({"all", "mlp"}))->capture_default_str();
  app.add_flag("--record-layernorms", a.record_layernorms, "also record the layernorms' gains and biases");
  app.add_flag("--record-embeddings", a.record_embeddings,
               "also record the token embedding (lookups and the tied output projection)");
  app.add_option("--top-fraction", a.top_fraction, "shifts kept per step, as a fraction of the recorded elements")
      ->capture_default_str();
  app.add_option("--neurons", a.neurons, "neurons reported")->capture_default_str();
  app.add_option("--contexts", a.contexts, "attributed contexts ablated per neuron")->capture_default_str();
  app.add_option("--random-neurons", a.random_neurons, "random neurons of the chance comparison")
      ->capture_default_str();
  app.add_option("--flip-rows", a.flip_rows, "rows of each flip table before the notable tokens")
      ->capture_default_str();
  app.add_option("--min-count", a.heuristic.min_count, "heuristic: least count of a token")->capture_default_str();
  app.add_option("--top-relative", a.heuristic.top_relative, "heuristic: tokens kept by relative frequency")
      ->capture_default_str();
  app.add_option("--top-count", a.heuristic.top_count, "heuristic: of those, kept by count")->capture_default_str();
  app.add_option("--seed", a.seed)->capture_default_str();
  app.add_option("--threads", a.threads, "0 = all cores");
  CLI11_PARSE(app, argc, argv);
  try {
    auto runtime = rlhf::configure_runtime({.threads = a.threads});
    if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);
#ifdef RLHF_SOURCE_DATA_DIR
    if (a.wikitext.empty() && !fs::exists(a.corpus) && a.corpus.rfind("data/", 0) == 0)
      a.corpus = (fs::path(RLHF_SOURCE_DATA_DIR) / a.corpus.substr(5)).string();
#endif
    auto corpus = load_corpus(a.wikitext, a.corpus);
    fmt::print("corpus: {}: {} training tokens, {} validation tokens, vocabulary {}\n", corpus.name,
               corpus.train.size(0), corpus.valid.size(0), corpus.vocab.words.size());

    torch::manual_seed(static_cast<uint64_t>(a.seed));
    rlhf::GPT2Config config{.vocab_size = static_cast<int64_t>(corpus.vocab.words.size()), .n_positions = a.context,
                            .n_embd = a.width, .n_layer = a.layers, .n_head = a.heads, .n_inner = a.hidden,
                            .activation_function = "relu", .embd_pdrop = a.dropout, .attn_pdrop = a.dropout,
                            .resid_pdrop = a.dropout, .bos_token_id = 0, .eos_token_id = 0,
                            .sinusoidal_positions = true,
                            .embedding_scale = a.embedding_scale.value_or(std::sqrt(static_cast<double>(a.width)))};
    rlhf::GPT2<> model(config);
    rlhf::init_uniform(*model, a.init);
    int64_t n_params = 0;
    for (const auto& p : model->parameters()) n_params += p.requires_grad() ? p.numel() : 0;
    fmt::print(
        "model: {} layers, {} heads, width {}, MLP {}, context {}, embedding scale {:.3f}, {} trainable "
        "parameters\n",
        a.layers, a.heads, a.width, a.hidden, a.context, config.embedding_scale, n_params);

    fs::create_directories(a.out);
    const auto db_path = fs::path(a.out) / "shifts.db";
    fs::remove(db_path);
    fs::remove(db_path.string() + "-wal");
    fs::remove(db_path.string() + "-shm");
    {
      auto store = std::make_shared<rlhf::ShiftStore>(db_path);
      rlhf::ShiftRecorder recorder(
          *model,
          {.units = a.units == "mlp" ? rlhf::Targets::MLP : rlhf::Targets::All,
           .layernorms = a.record_layernorms,
           .embeddings = a.record_embeddings,
           .top_fraction = a.top_fraction},
          store);
      store->write_vocab(corpus.vocab.words);
      store->set_meta("corpus", corpus.name);
      store->set_meta("model", config.to_json().dump());
      store->set_meta("optimizer", fmt::format("SGD lr {} gamma {} plateau /{} clip {}", a.lr, a.lr_gamma,
                                               a.plateau_div, a.clip));
      fmt::print("recording: {} elements of {} tensors, top {:.2f}% per step -> {}\n",
                 recorder.stats().recorded_elements, recorder.tensor_names().size(), 100 * a.top_fraction,
                 db_path.string());
      train(model, corpus, a, recorder);
      store->create_indexes();
      store->checkpoint();
      const auto st = store->stats();
      fmt::print("store: {} steps, {} shift rows, {:.1f} MB ({:.0f} bytes per step; the full per-datum dump would be "
                 "{:.0f} bytes per step)\n",
                 st.steps, st.rows, static_cast<double>(st.bytes) / 1e6, st.bytes_per_step(),
                 static_cast<double>(recorder.stats().recorded_elements) * static_cast<double>(a.batch) * 4.0);
    }
    model.save_pretrained(fs::path(a.out) / "model");
    report(model, corpus, a, db_path);
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
