// One PPO learning step (forward, loss, backward, AdamW as PPOTrainer runs them: rlhf::projected_token_stats with
// the sparse embedding gradient, rlhf::GroupedAdamW) on GPT-2-small shapes in fp32 and under bf16 autocast, and the
// same for a LoRA policy: seconds per step and achieved TFLOP/s of the matmuls.
//
//   train_step_bench [--batch 8] [--seq 66] [--gen 50] [--layers 12 --width 768 --heads 12 --vocab 50257]
//                    [--warmup 3] [--steps 5] [--threads N] [--no-lora] [--precision fp32 --precision bf16]
//                    [--decode-isa avx512_bf16|avx512|avx2|none]

#include <chrono>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

struct StepArgs {
  int64_t batch = 8, seq = 66, gen = 50, warmup = 3, steps = 5;
};

/// Mean seconds of a training step: forward of the policy, PPO-style loss over the last `gen` positions (log-prob of
/// the token and entropy over the full vocabulary through projected_token_stats, value loss), backward, AdamW step.
template <class Policy>
double step_seconds(Policy& policy, rlhf::Precision precision, const StepArgs& a) {
  policy->eval();  // PPOTrainer's default: no dropout in the learning forwards
  const auto vocab = policy->base->config().vocab_size;
  auto ids = torch::randint(0, vocab, {a.batch, a.seq}, torch::kLong);
  rlhf::GroupedAdamW optimizer;  // the trainers' optimiser: the fused CPU AdamW step
  optimizer.add("base", policy->base_parameters(), 1e-5).add("head", policy->head_parameters(), 1e-5);
  optimizer.build("train_step_bench");
  auto mask = torch::ones({a.batch, a.gen});
  auto run = [&] {
    torch::Tensor loss;
    {
      rlhf::AutocastScope autocast(precision, torch::kCPU);
      rlhf::SparseEmbeddingGrad sparse_embedding(*policy->base);  // as PPOTrainer: the lookup's gradient added in place
      auto hidden = policy->forward(ids).narrow(1, a.seq - a.gen - 1, a.gen);  // [B, G, D]
      // PPOTrainer's loss path: log p(token) and the entropy in one pass over the vocabulary per row, the logits
      // made, kept and turned into their gradient by one node (projected_token_stats).
      auto weight = policy->base->fusable_output_weight();
      auto stats = rlhf::projected_token_stats(hidden, weight, ids.narrow(1, a.seq - a.gen, a.gen), 1.0);
      auto values = policy->values(hidden);
      loss = -rlhf::masked_mean(stats.logprobs, mask) - 1e-3 * rlhf::masked_mean(stats.entropy, mask) +
             rlhf::masked_mean(values.pow(2), mask);
    }
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  };
  for (int64_t i = 0; i < a.warmup; ++i) run();  // first touch of gradients, AdamW state and activations
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < a.steps; ++i) run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / a.steps;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"PPO training-step speed, fp32 vs bf16, full vs LoRA"};
  StepArgs args;
  rlhf::GPT2Config config;
  int threads = 0;
  bool lora_too = true;
  app.add_option("--batch", args.batch)->capture_default_str();
  app.add_option("--seq", args.seq)->capture_default_str();
  app.add_option("--gen", args.gen)->capture_default_str();
  app.add_option("--warmup", args.warmup, "untimed steps first (the first ones fault their memory in)")
      ->capture_default_str();
  app.add_option("--steps", args.steps, "timed steps")->capture_default_str();
  app.add_option("--layers", config.n_layer)->capture_default_str();
  app.add_option("--width", config.n_embd)->capture_default_str();
  app.add_option("--heads", config.n_head)->capture_default_str();
  app.add_option("--vocab", config.vocab_size)->capture_default_str();
  app.add_option("--threads", threads, "0 = all cores");
  app.add_flag("!--no-lora", lora_too, "measure full fine-tuning only");
  std::vector<std::string> precision_names{"fp32", "bf16"};
  app.add_option("--precision", precision_names, "the precisions measured (repeat the option for several)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
  rlhf::DecodeIsa isa_cap = rlhf::DecodeIsa::avx512_bf16;
  rlhf::bench::add_decode_isa_option(app, isa_cap);
  CLI11_PARSE(app, argc, argv);
  rlhf::set_decode_isa(isa_cap);
  std::vector<rlhf::Precision> precisions;
  for (const auto& name : precision_names) precisions.push_back(rlhf::parse_precision(name));
  auto runtime = rlhf::configure_runtime({.threads = threads});
  if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);

  // Matmul FLOPs of forward + backward (3x forward): blocks, plus the vocabulary projection of `gen` positions.
  const double flops = 3.0 * (rlhf::bench::block_flops(config, args.batch * args.seq, args.seq) +
                              rlhf::bench::vocab_flops(config, args.batch * args.gen));

  nlohmann::json results = nlohmann::json::array();
  fmt::print("GPT-2 {} layers, batch {} x {} tokens ({} scored), {} threads\n", config.n_layer, args.batch, args.seq,
             args.gen, runtime.threads);
  fmt::print("{:<6} {:<6} {:>10} {:>10}\n", "model", "dtype", "s/step", "TFLOP/s");
  auto report = [&](const char* model, rlhf::Precision precision, double seconds, double step_flops) {
    fmt::print("{:<6} {:<6} {:>10.3f} {:>10.3f}\n", model, rlhf::to_string(precision), seconds,
               step_flops / seconds / 1e12);
    results.push_back({{"model", model}, {"precision", rlhf::to_string(precision)}, {"seconds_per_step", seconds},
                       {"tflops", step_flops / seconds / 1e12}});
  };
  torch::manual_seed(0);
  {
    rlhf::GPT2Policy full{rlhf::GPT2<>(config)};
    for (auto p : precisions) report("full", p, step_seconds(full, p, args), flops);
  }
  if (lora_too) {
    using LoRAPolicy = rlhf::ActorCritic<rlhf::GPT2<rlhf::LoRA<8, rlhf::Targets::Attention | rlhf::Targets::MLP>>>;
    LoRAPolicy lora{rlhf::GPT2<rlhf::LoRA<8, rlhf::Targets::Attention | rlhf::Targets::MLP>>(config)};
    // No weight gradients for frozen layers: backward costs ~2x forward instead of 3x.
    for (auto p : precisions) report("lora", p, step_seconds(lora, p, args), flops * 2.0 / 3.0);
  }
  fmt::print("{}\n", nlohmann::json{{"benchmark", "train_step"},
                                    {"threads", runtime.threads},
                                    {"decode_isa", rlhf::bench::decode_isa_name(rlhf::decode_isa())},
                                    {"results", results}}.dump());
}
