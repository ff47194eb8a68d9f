// Sampling speed with the KV cache: new tokens/s at batch 1 and 16 for GPT-2-small shapes (random weights), in fp32,
// in bf16 (bf16 weights) and under bf16 autocast (fp32 weights, as PPOConfig::precision = bf16 samples), with the
// batch-1 memory-bandwidth floor (bytes of weights read per token / measured copy bandwidth; bf16 bytes for bf16 and
// autocast, which decode from bf16 copies of the weights).
//
//   generation_bench [--layers 12 --width 768 --heads 12 --vocab 50257] [--new-tokens 32] [--batch 1 16]
//                    [--dtype fp32 bf16 autocast] [--decode-isa avx512_bf16|avx512|avx2|none] [--threads N]

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

using rlhf::bench::seconds_since;

int main(int argc, char** argv) {
  CLI::App app{"KV-cache sampling speed"};
  rlhf::GPT2Config config;
  int64_t new_tokens = 32;
  int threads = 0;
  std::vector<int64_t> batches = {1, 16};
  app.add_option("--layers", config.n_layer)->capture_default_str();
  app.add_option("--width", config.n_embd)->capture_default_str();
  app.add_option("--heads", config.n_head)->capture_default_str();
  app.add_option("--vocab", config.vocab_size)->capture_default_str();
  app.add_option("--new-tokens", new_tokens)->capture_default_str();
  app.add_option("--batch", batches, "batch sizes")->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores");
  std::vector<std::string> dtypes = {"fp32", "bf16", "autocast"};
  app.add_option("--dtype", dtypes, "fp32, bf16 (weights) or autocast (fp32 weights under bf16 autocast)")
      ->check(CLI::IsMember({"fp32", "bf16", "autocast"}))
      ->capture_default_str();
  bool kernels = true;
  app.add_flag("!--no-decode-kernels", kernels, "decode with torch's addmm / matmul only (rlhf::set_decode_kernels)");
  rlhf::DecodeIsa isa_cap = rlhf::DecodeIsa::avx512_bf16;
  rlhf::bench::add_decode_isa_option(app, isa_cap);
  CLI11_PARSE(app, argc, argv);
  rlhf::set_decode_isa(kernels ? isa_cap : rlhf::DecodeIsa::none);

  auto runtime = rlhf::configure_runtime({.threads = threads});
  if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);
  const double bandwidth = rlhf::bench::copy_bandwidth();
  torch::manual_seed(0);
  rlhf::GPT2<> model(config);
  nlohmann::json results = nlohmann::json::array();
  fmt::print("threads {}, copy bandwidth {:.1f} GB/s, decode kernels: {}\n", runtime.threads, bandwidth / 1e9,
             rlhf::bench::decode_isa_name(rlhf::decode_isa()));
  fmt::print("{:<6} {:>5} {:>12} {:>12} {:>14} {:>8}\n", "dtype", "batch", "tokens/s", "ms/step", "floor ms/step",
             "x floor");
  for (const auto& name : dtypes) {
    const auto dtype = name == "bf16" ? torch::kBFloat16 : torch::kFloat;
    const auto precision = name == "autocast" ? rlhf::Precision::bf16 : rlhf::Precision::fp32;
    model->place(torch::kCPU, dtype);
    rlhf::AutocastScope autocast(precision, torch::kCPU);
    int64_t weight_bytes = 0;
    for (const auto& p : model->parameters()) weight_bytes += p.numel() * (name == "fp32" ? 4 : 2);
    // Per decoding step every weight is read once (wpe only one row, but it is small).
    const double floor_ms = 1e3 * static_cast<double>(weight_bytes) / bandwidth;
    for (int64_t b : batches) {
      auto prompt = torch::randint(0, config.vocab_size, {b, 16}, torch::kLong);
      rlhf::generate(*model, prompt, {}, {.max_new_tokens = 2, .seed = 1});  // warm-up
      auto start = std::chrono::steady_clock::now();
      rlhf::generate(*model, prompt, {}, {.max_new_tokens = new_tokens, .seed = 1});
      const double s = seconds_since(start);
      const double tps = static_cast<double>(b * new_tokens) / s;
      const double ms = 1e3 * s / static_cast<double>(new_tokens);
      fmt::print("{:<6} {:>5} {:>12.1f} {:>12.2f} {:>14.2f} {:>8.2f}\n", name, b, tps, ms, floor_ms, ms / floor_ms);
      results.push_back({{"dtype", name}, {"batch", b}, {"tokens_per_s", tps}, {"ms_per_step", ms},
                         {"bandwidth_floor_ms_per_step", floor_ms}, {"x_floor", ms / floor_ms}});
    }
  }
  fmt::print("{}\n", nlohmann::json{{"benchmark", "generation"}, {"threads", runtime.threads}, {"decode_kernels", kernels},
                                    {"decode_isa", rlhf::bench::decode_isa_name(rlhf::decode_isa())},
                                    {"copy_bandwidth_gb_s", bandwidth / 1e9}, {"results", results}}
                         .dump());
}
