// The built-in demo (the README's first command): creates a small GPT-2 with a byte-level tokenizer (or loads a
// Hugging Face GPT-2 folder given with --model), saves and reloads it, samples continuations with the KV cache, and
// reports sampling speed in tokens/s, also for GPT-2-small shapes in fp32 and bf16.

#include <chrono>
#include <filesystem>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <rlhf/rlhf.hpp>

namespace {

struct Speed {
  double tokens_per_second;
  double seconds;
};

/// Samples `new_tokens` after a 16-token prompt for `batch` rows and returns the new-token rate.
Speed sampling_speed(rlhf::GPT2Impl<>& model, int64_t batch, int64_t new_tokens) {
  auto prompt = torch::randint(0, model.config().vocab_size, {batch, 16}, torch::kLong);
  rlhf::SamplingConfig config{.max_new_tokens = 4, .seed = 1};
  rlhf::generate(model, prompt, {}, config);  // warm-up
  config.max_new_tokens = new_tokens;
  const auto start = std::chrono::steady_clock::now();
  rlhf::generate(model, prompt, {}, config);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return {static_cast<double>(batch * new_tokens) / seconds, seconds};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rlhf demo: a small GPT-2, saved, reloaded and sampled with a KV cache"};
  std::string model_dir, tokenizer_dir, out_dir = "out/demo";
  std::vector<std::string> prompts = {"The quick brown fox", "Once upon a time", "RLHF in C++"};
  int64_t new_tokens = 40;
  int threads = 0;
  bool skip_gpt2_small = false;
  app.add_option("--model", model_dir, "Hugging Face GPT-2 folder (default: create a small random one)");
  app.add_option("--tokenizer", tokenizer_dir, "tokenizer folder (default: the model folder)");
  app.add_option("--prompt", prompts, "prompts to continue");
  app.add_option("--new-tokens", new_tokens, "tokens to sample per prompt")->capture_default_str();
  app.add_option("--out", out_dir, "where the created model is saved")->capture_default_str();
  app.add_option("--threads", threads, "intra-op threads (0 = all cores)");
  app.add_flag("--skip-gpt2-small", skip_gpt2_small, "skip the GPT-2-small-shaped speed measurement");
  CLI11_PARSE(app, argc, argv);

  try {
    auto runtime = rlhf::configure_runtime({.threads = threads});
    fmt::print("threads: {}, BLAS: {}\n", runtime.threads, runtime.blas.empty() ? "(none loaded)" : runtime.blas);
    if (auto warning = runtime.warning(); !warning.empty()) fmt::print("{}\n", warning);

    if (model_dir.empty()) {
      auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
      rlhf::GPT2Config config{.vocab_size = tokenizer.vocab_size(), .n_positions = 256, .n_embd = 256,
                              .n_layer = 4, .n_head = 4, .bos_token_id = tokenizer.eos_id(),
                              .eos_token_id = tokenizer.eos_id()};
      torch::manual_seed(0);
      rlhf::GPT2<> fresh(config);
      model_dir = (std::filesystem::path(out_dir) / "model").string();
      fresh.save_pretrained(model_dir);
      tokenizer.save_pretrained(model_dir);
      fmt::print("created a random GPT-2 ({} layers, width {}, byte-level vocabulary of {}) in {}\n",
                 config.n_layer, config.n_embd, config.vocab_size, model_dir);
      fmt::print("(untrained weights: the samples below are noise; pass --model DIR for a trained GPT-2)\n");
    }
    auto model = rlhf::GPT2<>::from_pretrained(model_dir);
    auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(tokenizer_dir.empty() ? model_dir : tokenizer_dir);
    fmt::print("loaded {} ({} parameters)\n\n", model_dir,
               [&] {
                 int64_t n = 0;
                 for (const auto& p : model->parameters()) n += p.numel();
                 return n;
               }());

    auto batch = rlhf::encode_batch(tokenizer, prompts, tokenizer.eos_id());
    rlhf::generate(*model, batch.input_ids, batch.attention_mask, {.max_new_tokens = 2});  // warm-up
    const auto start = std::chrono::steady_clock::now();
    auto gen = rlhf::generate(*model, batch.input_ids, batch.attention_mask,
                              {.max_new_tokens = new_tokens, .temperature = 1.0, .top_k = 10, .seed = 0});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto tokens = gen.new_tokens();
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto row = tokens[static_cast<int64_t>(i)].contiguous();
      std::vector<int64_t> ids(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
      fmt::print("[{}] {}\n", i, rlhf::printable(prompts[i] + tokenizer.decode(ids)));
    }
    fmt::print("\nsampled {} x {} tokens in {:.2f} s: {:.1f} tokens/s\n", prompts.size(), new_tokens, seconds,
               static_cast<double>(prompts.size() * new_tokens) / seconds);

    if (!skip_gpt2_small) {
      fmt::print("\nsampling speed, GPT-2-small shapes (124M parameters, random weights, 16-token prompts):\n");
      torch::manual_seed(0);
      rlhf::GPT2<> small(rlhf::GPT2Config{});
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        small->place(torch::kCPU, dtype);
        for (int64_t b : {1, 16}) {
          auto speed = sampling_speed(*small, b, b == 1 ? 32 : 24);
          fmt::print("  {:<9} batch {:>2}: {:7.1f} new tokens/s\n", dtype == torch::kFloat ? "fp32" : "bf16", b,
                     speed.tokens_per_second);
        }
      }
    }
  } catch (const rlhf::Error& e) {
    fmt::print(stderr, "rlhf_demo: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
