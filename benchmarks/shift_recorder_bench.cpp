// The cost of recording per-datum parameter shifts (rlhf::ShiftRecorder) on the model of the training-transparency
// experiments (3 layers, 4 heads, width 200, MLP 200, sinusoidal positions, dropout 0.2, SGD lr 5 with clipping at
// 0.5) at their batch shape (20 data x 35 tokens): time of a plain step, of a recorded step (MLP weights, and every
// linear layer), and of the original method, one backward pass per datum; SQLite bytes per step against the
// original's full per-datum dump (recorded elements x batch x 4 bytes per step).
//
//   shift_recorder_bench [--batch 20] [--seq 35] [--vocab 28782] [--width 200] [--hidden 200] [--layers 3]
//                        [--heads 4] [--steps 12] [--rounds 3] [--threads N] [--keep-db FILE]

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

struct BenchArgs {
  int64_t batch = 20, seq = 35, steps = 12, rounds = 3;
  double lr = 5.0, max_norm = 0.5;
};

/// The step of the experiments: mean next-token cross-entropy over the batch's B x T targets, backward, clipping,
/// SGD. `ids` [B, T + 1]: each row is a datum, inputs ids[:, :T], targets ids[:, 1:]. `callback` (may be null) is
/// called as a trainer calls its step callbacks.
void sgd_step(rlhf::GPT2<>& model, torch::optim::SGD& sgd, const std::vector<torch::Tensor>& params,
              const torch::Tensor& ids, double max_norm, int64_t step, rlhf::StepCallback* callback) {
  const int64_t t = ids.size(1) - 1;
  rlhf::StepInfo info{.step = step, .ids = ids, .optimizer = &sgd};
  if (callback) callback->on_step_begin(info);
  sgd.zero_grad();
  auto logits = model->logits(model->forward(ids.narrow(1, 0, t)));  // [B, T, V]
  auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                   ids.narrow(1, 1, t).reshape({-1}));
  loss.backward();
  const double norm = torch::nn::utils::clip_grad_norm_(params, max_norm);
  info.grad_norm = norm;
  info.clip_coef = rlhf::clip_coefficient(max_norm, norm);
  if (callback) callback->on_gradients(info);
  sgd.step();
  if (callback) callback->on_step_end(info);
}

/// The original method: one backward pass per datum through the batch's graph (the loss unrolled per datum, as
/// CrossEntropyLoss(reduction='none') allows), each datum's gradient of every parameter kept, then summed, clipped
/// and applied. Per datum, not per token: B backward passes per step.
void per_datum_step(rlhf::GPT2<>& model, torch::optim::SGD& sgd, const std::vector<torch::Tensor>& params,
                    const torch::Tensor& ids, double max_norm) {
  const int64_t b = ids.size(0), t = ids.size(1) - 1;
  sgd.zero_grad();
  auto logits = model->logits(model->forward(ids.narrow(1, 0, t)));  // [B, T, V]
  auto nll = torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}), ids.narrow(1, 1, t).reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));  // [B T]
  auto per_datum = nll.view({b, t}).sum(1) / static_cast<double>(b * t);      // [B]: datum b's share of the loss
  std::vector<torch::Tensor> sum(params.size());
  for (int64_t row = 0; row < b; ++row) {
    auto grads = torch::autograd::grad({per_datum[row]}, params, {}, /*retain_graph=*/row + 1 < b);
    for (size_t i = 0; i < params.size(); ++i) sum[i] = sum[i].defined() ? sum[i] + grads[i] : grads[i];
  }
  for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = sum[i];
  torch::nn::utils::clip_grad_norm_(params, max_norm);
  sgd.step();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double load_average() {
  double load[1] = {0};
  return getloadavg(load, 1) == 1 ? load[0] : -1.0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Recording cost of per-datum parameter shifts: plain step vs recorded step vs one backward per datum"};
  BenchArgs args;
  rlhf::GPT2Config config{.vocab_size = 28782, .n_embd = 200, .n_layer = 3, .n_head = 4, .n_inner = 200,
                          .activation_function = "relu", .embd_pdrop = 0.2, .attn_pdrop = 0.2, .resid_pdrop = 0.2,
                          .sinusoidal_positions = true};
  int64_t hidden = 200;
  int threads = 0;
  std::string keep_db;
  app.add_option("--batch", args.batch)->capture_default_str();
  app.add_option("--seq", args.seq, "tokens per datum (context)")->capture_default_str();
  app.add_option("--vocab", config.vocab_size, "28782: WikiText-2 with basic_english")->capture_default_str();
  app.add_option("--width", config.n_embd)->capture_default_str();
  app.add_option("--hidden", hidden, "MLP width")->capture_default_str();
  app.add_option("--layers", config.n_layer)->capture_default_str();
  app.add_option("--heads", config.n_head)->capture_default_str();
  app.add_option("--steps", args.steps, "timed steps per mode and round")->capture_default_str();
  app.add_option("--rounds", args.rounds, "rounds of all modes, interleaved against load drift")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores");
  app.add_option("--keep-db", keep_db, "keep the SQLite store of the all-linear-layers run at this path");
  CLI11_PARSE(app, argc, argv);
  config.n_inner = hidden;
  config.n_positions = args.seq;
  auto runtime = rlhf::configure_runtime({.threads = threads});
  if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);
  const double load_before = load_average();

  torch::manual_seed(0);
  rlhf::GPT2<> model(config);
  rlhf::init_uniform(*model, 0.1);
  model->train();
  std::vector<torch::Tensor> params;
  for (auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(args.lr));
  // Small steps would not change the timings, but SGD at lr 5 on random data could: keep the weights where they
  // are by restoring them after every step.
  std::vector<torch::Tensor> initial;
  for (auto& p : params) initial.push_back(p.detach().clone());
  auto restore = [&] {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(initial[i]);
  };

  const auto dir = std::filesystem::temp_directory_path() / fmt::format("shift_recorder_bench_{}", getpid());
  std::filesystem::create_directories(dir);
  struct Mode {
    std::string name;
    rlhf::ShiftRecorderOptions options;
    bool record = false, per_datum = false;
    std::shared_ptr<rlhf::ShiftStore> store;
    std::vector<double> seconds;
    int64_t recorded_elements = 0, recorded_steps = 0, entries = 0;
    double recorder_seconds = 0;
    int64_t base_bytes = 0;  // the empty store's file
  };
  std::vector<Mode> modes = {
      {.name = "plain"},
      {.name = "recorded (MLP)", .options = {.units = rlhf::Targets::MLP}, .record = true},
      {.name = "recorded (all linear)", .options = {.units = rlhf::Targets::All}, .record = true},
      {.name = "recorded (all tensors)",
       .options = {.units = rlhf::Targets::All, .biases = true, .layernorms = true, .embeddings = true},
       .record = true},
      {.name = "per-datum backward", .per_datum = true}};
  for (size_t i = 0; i < modes.size(); ++i) {
    auto& m = modes[i];
    if (!m.record) continue;
    m.store = std::make_shared<rlhf::ShiftStore>(dir / fmt::format("mode{}.db", i));
    // The schema and the units table are written once per store, not per step: measure from here.
    rlhf::ShiftRecorder register_units(*model, m.options, m.store);
    m.store->checkpoint();
    m.base_bytes = m.store->stats().bytes;
  }

  int64_t step = 0;
  auto batch_ids = [&](int64_t i) {
    auto gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(i));
    return torch::randint(config.vocab_size, {args.batch, args.seq + 1}, gen, torch::kLong);
  };
  for (int64_t round = 0; round < args.rounds; ++round) {
    for (auto& m : modes) {
      // One recorder per model at a time (its captures own the layers' hook points): each recording mode attaches
      // its own for its steps and detaches it after.
      std::shared_ptr<rlhf::ShiftRecorder> recorder;
      if (m.record) {
        recorder = std::make_shared<rlhf::ShiftRecorder>(*model, m.options, m.store);
        m.recorded_elements = recorder->stats().recorded_elements;
      }
      for (int64_t s = -1; s < args.steps; ++s) {  // s = -1: warm-up
        auto ids = batch_ids(step);
        const auto start = std::chrono::steady_clock::now();
        if (m.per_datum)
          per_datum_step(model, sgd, params, ids, args.max_norm);
        else
          sgd_step(model, sgd, params, ids, args.max_norm, step, recorder.get());
        if (s >= 0) m.seconds.push_back(rlhf::bench::seconds_since(start));
        restore();
        ++step;
      }
      if (recorder) {
        const auto rs = recorder->stats();
        m.recorded_steps += rs.steps;
        m.entries += rs.entries;
        m.recorder_seconds += rs.seconds;
      }
    }
  }
  const double load_after = load_average();

  nlohmann::json results = nlohmann::json::array();
  const double plain = median(modes[0].seconds);
  fmt::print("model: {} layers, width {}, MLP {}, {} heads, vocab {}, sinusoidal positions; batch {} x {} tokens; "
             "{} threads; load average {:.1f} before, {:.1f} after\n",
             config.n_layer, config.n_embd, hidden, config.n_head, config.vocab_size, args.batch, args.seq,
             runtime.threads, load_before, load_after);
  fmt::print("{:<24} {:>10} {:>8} {:>12} {:>14} {:>14} {:>10}\n", "mode", "ms/step", "x plain", "recorder ms",
             "bytes/step", "full dump/step", "smaller");
  for (auto& m : modes) {
    const double sec = median(m.seconds);
    nlohmann::json row = {{"mode", m.name}, {"ms_per_step", sec * 1e3}, {"ratio", sec / plain},
                          {"steps", m.seconds.size()}};
    std::string recorder_text, bytes, full, smaller;
    if (m.record) {
      m.store->checkpoint();
      const auto st = m.store->stats();
      const double bytes_per_step =
          static_cast<double>(st.bytes - m.base_bytes) / static_cast<double>(std::max<int64_t>(st.steps, 1));
      const double recorder_ms = m.recorder_seconds / static_cast<double>(m.recorded_steps) * 1e3;
      // What the original stored: every recorded element's per-datum diff, fp32.
      const double full_dump = static_cast<double>(m.recorded_elements) * static_cast<double>(args.batch) * 4.0;
      row["recorder_ms_per_step"] = recorder_ms;
      row["recorded_elements"] = m.recorded_elements;
      row["shifts_per_step"] = m.entries / m.recorded_steps;
      row["bytes_per_step"] = bytes_per_step;
      row["full_dump_bytes_per_step"] = full_dump;
      row["storage_ratio"] = full_dump / bytes_per_step;
      row["writer_rows_per_second"] = st.rows_per_second();
      recorder_text = fmt::format("{:.1f}", recorder_ms);
      bytes = fmt::format("{:.0f}", bytes_per_step);
      full = fmt::format("{:.0f}", full_dump);
      smaller = fmt::format("{:.0f}x", full_dump / bytes_per_step);
    }
    fmt::print("{:<24} {:>10.1f} {:>8.2f} {:>12} {:>14} {:>14} {:>10}\n", m.name, sec * 1e3, sec / plain, recorder_text,
               bytes, full, smaller);
    results.push_back(row);
  }
  fmt::print("recorded steps keep the top 0.13% of the recorded elements' per-datum shifts; bytes/step = growth of "
             "the SQLite file (after checkpoint) / steps (random data: every step's 20 data are new, so their token text is stored "
             "every step)\n");
  for (auto& m : modes) m.store.reset();
  if (!keep_db.empty())
    std::filesystem::copy_file(dir / "mode2.db", keep_db, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::remove_all(dir);
  fmt::print("{}\n", nlohmann::json{{"benchmark", "shift_recorder"},
                                    {"threads", runtime.threads},
                                    {"batch", args.batch},
                                    {"seq", args.seq},
                                    {"load_average", {load_before, load_after}},
                                    {"model", {{"layers", config.n_layer}, {"width", config.n_embd},
                                               {"hidden", hidden}, {"heads", config.n_head},
                                               {"vocab", config.vocab_size}}},
                                    {"results", results}}
                         .dump());
}
