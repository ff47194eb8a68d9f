// The `rlhf` command: check a model and a tokenizer from the shell, and compare them with other implementations.
//
//   rlhf tokenize --tokenizer DIR [--special] < text        -> JSON array of ids
//   rlhf forward  --model DIR --ids 1,2,3 --out logits.safetensors   (F32 "logits" [1, T, V])
//   rlhf generate --model DIR --tokenizer DIR --prompt TEXT [sampling flags]
//   rlhf init     --out DIR [--layers N --heads N --width N --positions N --seed S]   (random GPT-2 + byte tokenizer)

#include <chrono>
#include <iostream>
#include <iterator>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <rlhf/rlhf.hpp>

namespace {

torch::Device parse_device(const std::string& name) {
  try {
    return torch::Device(name);
  } catch (const c10::Error&) {
    rlhf::detail::fail("--device: '{}' is not a device (expected cpu, cuda, cuda:1, ...)", name);
  }
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return torch::kFloat;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") return torch::kHalf;
  rlhf::detail::fail("--dtype: '{}' is not one of float32, bfloat16, float16", name);
}

void run_tokenize(const std::string& tokenizer_dir, bool special) {
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(tokenizer_dir);
  std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  fmt::print("[{}]\n", fmt::join(tokenizer.encode(text, special), ","));
}

void run_forward(const std::string& model_dir, const std::vector<int64_t>& ids, const std::string& out,
                 const std::string& device) {
  auto model = rlhf::GPT2<>::from_pretrained(model_dir, {.device = parse_device(device)});
  model->eval();
  c10::InferenceMode inference;
  auto input = torch::tensor(ids, torch::kLong).unsqueeze(0).to(model->device());  // [1, T]
  auto logits = model->logits(model->forward(input)).to(torch::kCPU);            // [1, T, V]
  rlhf::save_safetensors(out, {{"logits", logits}});
  fmt::print(stderr, "wrote logits [1, {}, {}] to {}\n", logits.size(1), logits.size(2), out);
}

struct GenerateArgs {
  std::string model, tokenizer, prompt, device = "cpu", dtype = "float32";
  int64_t num_samples = 1;
  bool special = false;
  rlhf::SamplingConfig sampling;
};

void run_generate(GenerateArgs args) {
  auto model = rlhf::GPT2<>::from_pretrained(
      args.model, {.device = parse_device(args.device), .dtype = parse_dtype(args.dtype)});
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(args.tokenizer.empty() ? args.model : args.tokenizer);
  auto ids = tokenizer.encode(args.prompt, args.special);
  if (ids.empty()) ids.push_back(tokenizer.eos_id());  // an empty prompt starts from <|endoftext|>, as GPT-2 does
  auto prompt = torch::tensor(ids, torch::kLong).unsqueeze(0).expand({args.num_samples, -1}).contiguous();
  if (args.sampling.stop_at_eos) args.sampling.eos_id = tokenizer.eos_id();
  args.sampling.pad_id = tokenizer.eos_id();
  const auto start = std::chrono::steady_clock::now();
  auto gen = rlhf::generate(*model, prompt.to(model->device()), {}, args.sampling);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  auto tokens = gen.new_tokens().to(torch::kCPU);
  auto mask = gen.generated_mask.to(torch::kCPU);
  for (int64_t row = 0; row < tokens.size(0); ++row) {
    std::vector<int64_t> out;
    for (int64_t j = 0; j < tokens.size(1); ++j)
      if (mask[row][j].item<int64_t>()) out.push_back(tokens[row][j].item<int64_t>());
    fmt::print("{}{}\n", args.prompt, tokenizer.decode(out));
  }
  fmt::print(stderr, "{} new tokens in {:.2f} s ({:.1f} tokens/s)\n", mask.sum().item<int64_t>(), seconds,
             mask.sum().item<int64_t>() / seconds);
}

void run_init(const std::string& out, rlhf::GPT2Config config, uint64_t seed) {
  auto tokenizer = rlhf::GPT2Tokenizer::byte_level();
  config.vocab_size = tokenizer.vocab_size();
  config.bos_token_id = config.eos_token_id = tokenizer.eos_id();
  torch::manual_seed(seed);
  rlhf::GPT2<> model(config);
  model.save_pretrained(out);
  tokenizer.save_pretrained(out);
  fmt::print(stderr, "wrote a random GPT-2 ({} layers, {} wide, byte-level vocabulary of {}) to {}\n",
             config.n_layer, config.n_embd, config.vocab_size, out);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rlhf: GPT-2 models, tokenizers and sampling from the command line"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "intra-op threads (0 = all cores)");

  auto* tokenize = app.add_subcommand("tokenize", "encode stdin and print the ids as a JSON array");
  std::string tokenizer_dir;
  bool special = false;
  tokenize->add_option("--tokenizer", tokenizer_dir, "folder with tokenizer.json or vocab.json + merges.txt")
      ->required();
  tokenize->add_flag("--special", special, "treat <|endoftext|> in the text as the special token");

  auto* forward = app.add_subcommand("forward", "write the logits of a token sequence to a safetensors file");
  std::string model_dir, out, device = "cpu";
  std::vector<int64_t> ids;
  forward->add_option("--model", model_dir, "Hugging Face GPT-2 folder (config.json + model.safetensors)")
      ->required();
  forward->add_option("--ids", ids, "token ids, e.g. 1,2,3")->required()->delimiter(',');
  forward->add_option("--out", out, "output file: F32 tensor 'logits' [1, T, V]")->required();
  forward->add_option("--device", device, "cpu, cuda, cuda:1, ...");

  auto* generate = app.add_subcommand("generate", "sample continuations of a prompt");
  GenerateArgs gen;
  generate->add_option("--model", gen.model, "Hugging Face GPT-2 folder")->required();
  generate->add_option("--tokenizer", gen.tokenizer, "tokenizer folder (default: the model folder)");
  generate->add_option("--prompt", gen.prompt, "text to continue")->required();
  generate->add_option("--max-new-tokens", gen.sampling.max_new_tokens, "tokens to generate")->capture_default_str();
  generate->add_option("--temperature", gen.sampling.temperature, "0 = greedy")->capture_default_str();
  generate->add_option("--top-k", gen.sampling.top_k, "0 = off")->capture_default_str();
  generate->add_option("--top-p", gen.sampling.top_p, "1 = off")->capture_default_str();
  generate->add_option("--seed", gen.sampling.seed, "random seed")->capture_default_str();
  generate->add_option("--num-samples", gen.num_samples, "continuations to sample")->capture_default_str();
  generate->add_flag("--stop-at-eos", gen.sampling.stop_at_eos, "end a continuation at <|endoftext|>");
  generate->add_flag("--special", gen.special, "treat <|endoftext|> in the prompt as the special token");
  generate->add_option("--device", gen.device, "cpu, cuda, ...")->capture_default_str();
  generate->add_option("--dtype", gen.dtype, "float32, bfloat16, float16")->capture_default_str();

  auto* init = app.add_subcommand("init", "write a randomly initialised GPT-2 with a byte-level tokenizer");
  std::string init_out;
  rlhf::GPT2Config init_config{.n_positions = 256, .n_embd = 128, .n_layer = 4, .n_head = 4};
  uint64_t seed = 0;
  init->add_option("--out", init_out, "output folder")->required();
  init->add_option("--layers", init_config.n_layer)->capture_default_str();
  init->add_option("--heads", init_config.n_head)->capture_default_str();
  init->add_option("--width", init_config.n_embd)->capture_default_str();
  init->add_option("--positions", init_config.n_positions)->capture_default_str();
  init->add_option("--seed", seed)->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  try {
    auto runtime = rlhf::configure_runtime({.threads = threads});
    if (auto warning = runtime.warning(); !warning.empty()) fmt::print(stderr, "{}\n", warning);
    if (*tokenize) run_tokenize(tokenizer_dir, special);
    if (*forward) run_forward(model_dir, ids, out, device);
    if (*generate) run_generate(gen);
    if (*init) run_init(init_out, init_config, seed);
  } catch (const rlhf::Error& e) {
    fmt::print(stderr, "rlhf: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
