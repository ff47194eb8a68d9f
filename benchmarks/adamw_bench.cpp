// One AdamW step over GPT-2-small's 124M fp32 parameters (the 148 tensors of the model, random values and
// gradients): torch::optim::AdamW's step against GroupedAdamW's fused step, in seconds and in GB/s of the bytes a
// step must move (read parameter, gradient and both moments, write parameter and moments: 28 bytes per parameter),
// next to the machine's copy bandwidth measured in the same run. Each row carries the load average (/proc/loadavg,
// as `uptime` prints it) read just before it: on a shared machine a row is comparable only at a low load.
//
//   adamw_bench [--steps 5] [--threads 2] [--layers 12 --width 768 --vocab 50257 --positions 1024]

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

/// The shapes of GPT-2's parameters: embeddings, per block two layernorms, the attention and MLP projections with
/// their biases, the final layernorm (124,439,808 values at 12 x 768, vocabulary 50257, 1024 positions).
std::vector<std::vector<int64_t>> gpt2_shapes(int64_t layers, int64_t width, int64_t vocab, int64_t positions) {
  std::vector<std::vector<int64_t>> shapes = {{vocab, width}, {positions, width}};
  for (int64_t i = 0; i < layers; ++i) {
    for (std::vector<int64_t> shape : std::vector<std::vector<int64_t>>{
             {width}, {width}, {width, 3 * width}, {3 * width}, {width, width}, {width},  // ln_1, attention
             {width}, {width}, {width, 4 * width}, {4 * width}, {4 * width, width}, {width}})  // ln_2, MLP
      shapes.push_back(shape);
  }
  shapes.push_back({width});
  shapes.push_back({width});
  return shapes;
}

/// The 1-, 5- and 15-minute load averages, as `uptime` prints them.
std::string load_average() {
  std::ifstream file("/proc/loadavg");
  double one = 0, five = 0, fifteen = 0;
  file >> one >> five >> fifteen;
  return fmt::format("{:.2f} {:.2f} {:.2f}", one, five, fifteen);
}

struct Timing {
  double best = 0, mean = 0;
  std::string load;  ///< load average read before the timed steps
};

/// Best and mean seconds of `steps` calls of `step` after one untimed call (which creates the moments).
template <class Step>
Timing time_steps(Step&& step, int64_t steps) {
  step();
  Timing t{.best = 1e30, .mean = 0, .load = load_average()};
  for (int64_t i = 0; i < steps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    step();
    const double s = rlhf::bench::seconds_since(start);
    t.best = std::min(t.best, s);
    t.mean += s / static_cast<double>(steps);
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"AdamW step: torch::optim::AdamW against GroupedAdamW's fused step"};
  int64_t steps = 5, layers = 12, width = 768, vocab = 50257, positions = 1024;
  int threads = 2;
  app.add_option("--steps", steps, "timed steps of each optimiser")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores")->capture_default_str();
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--width", width)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  app.add_option("--positions", positions)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  auto runtime = rlhf::configure_runtime({.threads = threads});
  if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);

  torch::manual_seed(0);
  std::vector<torch::Tensor> params;
  int64_t count = 0;
  for (const auto& shape : gpt2_shapes(layers, width, vocab, positions)) {
    auto p = (torch::randn(shape) * 0.02).requires_grad_(true);
    p.mutable_grad() = torch::randn(shape) * 1e-3;
    count += p.numel();
    params.push_back(p);
  }
  const double bytes = 28.0 * static_cast<double>(count);
  const std::string bandwidth_load = load_average();
  const double bandwidth = rlhf::bench::copy_bandwidth();

  // One optimiser at a time, so that only one set of moments (1 GB at 124M) is alive.
  Timing reference, fused;
  {
    torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(1e-5).weight_decay(0.01));
    reference = time_steps([&] { optimizer.step(); }, steps);
  }
  {
    rlhf::GroupedAdamW optimizer(0.01);
    optimizer.add("all", params, 1e-5).build("adamw_bench");
    fused = time_steps([&] { optimizer.step(); }, steps);
  }

  fmt::print("AdamW step, {} tensors, {:.1f} M fp32 parameters, {} threads; copy bandwidth {:.1f} GB/s (load {})\n",
             params.size(), static_cast<double>(count) / 1e6, runtime.threads, bandwidth / 1e9, bandwidth_load);
  fmt::print("floor (28 bytes per parameter / copy bandwidth): {:.3f} s\n", bytes / bandwidth);
  fmt::print("{:<22} {:>8} {:>8} {:>8} {:>9}  {}\n", "step", "best s", "mean s", "GB/s", "x floor", "load 1/5/15 min");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [name, t] : {std::pair{"torch::optim::AdamW", reference}, std::pair{"GroupedAdamW fused", fused}}) {
    fmt::print("{:<22} {:>8.3f} {:>8.3f} {:>8.1f} {:>9.2f}  {}\n", name, t.best, t.mean, bytes / t.best / 1e9,
               t.best / (bytes / bandwidth), t.load);
    rows.push_back({{"step", name}, {"best_seconds", t.best}, {"mean_seconds", t.mean},
                    {"gb_per_s", bytes / t.best / 1e9}, {"load", t.load}});
  }
  fmt::print("speed-up (best): {:.2f}x\n", reference.best / fused.best);
  fmt::print("{}\n", nlohmann::json{{"benchmark", "adamw"},
                                    {"threads", runtime.threads},
                                    {"parameters", count},
                                    {"copy_gb_per_s", bandwidth / 1e9},
                                    {"copy_load", bandwidth_load},
                                    {"results", rows}}
                         .dump());
}
