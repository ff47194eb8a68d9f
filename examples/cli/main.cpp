// The `rlhf` command: the RLHF recipe's stages as runs, and tools to check models and tokenizers from the shell.
//
//   rlhf pipeline [CONFIG] [--set key=value ...] [--resume]   the whole recipe on the built-in default (main job)
//   rlhf pretrain|sft|reward|ppo CONFIG [--set key=value ...] [--resume] [--keys]
//   rlhf eval CONFIG [--set ...]                             perplexity / reward accuracy / sample scores as JSON
//   rlhf sweep CONFIG [--set key=value ...] [--resume] [--keys]   grid / random / Bayesian search over PPO runs
//   rlhf generate --model DIR --prompt TEXT [sampling flags]
//   rlhf tokenize --tokenizer DIR [--special] < text        -> JSON array of ids
//   rlhf forward  --model DIR --ids 1,2,3 --out logits.safetensors   (F32 "logits" [1, T, V])
//   rlhf init     --out DIR [--layers N --heads N --width N --positions N --seed S]   (random GPT-2 + byte tokenizer)

#include <chrono>
#include <iostream>
#include <iterator>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <rlhf/pipeline/eval.hpp>
#include <rlhf/pipeline/main_job.hpp>
#include <rlhf/rlhf.hpp>
#include <rlhf/sweep/ppo_sweep.hpp>

namespace {

using rlhf::pipeline::parse_device;
using rlhf::pipeline::parse_dtype;

/// A stage's config file and overrides, as parsed by CLI11.
struct ConfigArgs {
  std::string file;
  std::vector<std::string> overrides;
  bool resume = false;
  bool keys = false;
  bool print = false;
};

/// Adds CONFIG, --set, --resume, --keys and --print-config to a subcommand.
void add_config_options(CLI::App* command, ConfigArgs& args, bool config_required, bool resumable) {
  auto* file = command->add_option("config", args.file, "TOML or JSON config file (see docs/config.md)");
  if (config_required) file->required();
  command->add_option("--set,-s", args.overrides, "override a key: --set train.lr=1e-4 (repeatable; later wins)")
      ->take_all();
  if (resumable) command->add_flag("--resume", args.resume, "continue the run folder from its latest checkpoint");
  command->add_flag("--keys", args.keys, "list every config key with its type, default and meaning, and exit");
  command->add_flag("--print-config", args.print, "print the resolved config as JSON and exit");
}

/// The config of a stage from its file (if any) and overrides, bound strictly (unknown keys are errors).
template <class Config>
Config resolve_config(const ConfigArgs& args, Config defaults = {}) {
  nlohmann::json json = args.file.empty() ? nlohmann::json::object() : rlhf::config::load_config_file(args.file);
  rlhf::config::apply_overrides(json, args.overrides);
  rlhf::config::bind_config(json, defaults, args.file.empty() ? std::string("--set") : args.file);
  return defaults;
}

/// Runs a config-driven subcommand: --keys / --print-config, else `run(config)`.
template <class Config, class Run>
int run_configured(const ConfigArgs& args, Run run, Config defaults = {}) {
  if (args.keys) {
    fmt::print("{}", rlhf::config::format_fields(rlhf::config::describe_fields(defaults)));
    return 0;
  }
  auto config = resolve_config(args, defaults);
  if (args.print) {
    fmt::print("{}\n", rlhf::config::to_json_config(config).dump(2));
    return 0;
  }
  return run(config);
}

/// Exit status of a stage: 0 when completed, 130 when interrupted (a checkpoint was written).
int stage_status(const rlhf::pipeline::StageResult& result) {
  if (!result.completed) return 130;
  fmt::print(stderr, "run folder: {}; model: {}\n", result.run_dir.string(), result.model_dir.string());
  if (!result.last_eval.empty()) fmt::print("{}\n", result.last_eval.dump());
  return 0;
}

/// `rlhf sweep`: a search over PPO runs (docs/sweeps.md). The space is an array of tables, so the config is read by
/// load_ppo_sweep_config rather than bound as one struct; --keys lists the struct's keys and the parameter keys.
int run_sweep_command(const ConfigArgs& args) {
  namespace sw = rlhf::sweep;
  if (args.keys) {
    fmt::print("{}", rlhf::config::format_fields(rlhf::config::describe_fields(sw::PPOSweepConfig{})));
    fmt::print("  space[i].name   string   a dotted key of [base], e.g. \"ppo.kl_coef\"\n"
               "  space[i].kind   uniform | log_uniform | integer | categorical\n"
               "  space[i].low    number   lower bound (uniform, log_uniform, integer)\n"
               "  space[i].high   number   upper bound, inclusive\n"
               "  space[i].log    bool     integer only: spaced in log(value)\n"
               "  space[i].choices array   categorical only: the values\n");
    return 0;
  }
  if (args.file.empty()) rlhf::detail::fail("sweep: give the sweep's config file (TOML or JSON, see docs/sweeps.md)");
  nlohmann::json json = rlhf::config::load_config_file(args.file);
  rlhf::config::apply_overrides(json, args.overrides);
  const auto config = sw::load_ppo_sweep_config(json, args.file);
  if (args.print) {
    fmt::print("{}\n", sw::resolved_config(config).dump(2));
    return 0;
  }
  const auto result = sw::run_ppo_sweep(config, args.resume, [&](const sw::Trial& t) {
    fmt::print(stderr, "sweep: trial {} of {}: {} {} ({:.1f} s)\n", t.index + 1, config.budget, t.point.dump(),
               t.ok() ? fmt::format("objective {:.6g}", t.objective) : fmt::format("failed: {}", t.error), t.seconds);
  });
  fmt::print(stderr, "sweep folder: {} (results.jsonl, summary.md, plot.png)\n", result.path.string());
  if (result.best) {
    const auto& best = result.trials[*result.best];
    fmt::print("{}\n", nlohmann::json{{"best_trial", best.index}, {"objective", best.objective}, {"params", best.point},
                                      {"metrics", best.metrics}}.dump());
  }
  return result.completed ? 0 : 130;
}

void run_tokenize(const std::string& tokenizer_dir, bool special) {
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(tokenizer_dir);
  std::string text((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  fmt::print("[{}]\n", fmt::join(tokenizer.encode(text, special), ","));
}

void run_forward(const std::string& model_dir, const std::vector<int64_t>& ids, const std::string& out,
                 const std::string& device) {
  auto model = rlhf::GPT2<>::from_pretrained(model_dir, {.device = parse_device(device, "--device")});
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
      args.model, {.device = parse_device(args.device, "--device"), .dtype = parse_dtype(args.dtype, "--dtype")});
  auto tokenizer = rlhf::GPT2Tokenizer::from_pretrained(args.tokenizer.empty() ? args.model : args.tokenizer);
  auto ids = tokenizer.encode(args.prompt, args.special);
  if (ids.empty()) ids.push_back(tokenizer.eos_id());  // an empty prompt starts from <|endoftext|>, as GPT-2 does
  auto prompt = torch::tensor(ids, torch::kLong).unsqueeze(0).expand({args.num_samples, -1}).contiguous();
  if (args.sampling.stop_at_eos) args.sampling.eos_id = tokenizer.eos_id();
  args.sampling.pad_id = tokenizer.eos_id();
  const auto start = std::chrono::steady_clock::now();
  auto gen = rlhf::generate(*model, prompt.to(model->device()), {}, args.sampling);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int64_t new_tokens = 0;
  for (const auto& ids : gen.token_ids()) {
    fmt::print("{}{}\n", args.prompt, tokenizer.decode(ids));
    new_tokens += static_cast<int64_t>(ids.size());
  }
  fmt::print(stderr, "{} new tokens in {:.2f} s ({:.1f} tokens/s)\n", new_tokens, seconds, new_tokens / seconds);
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
  CLI::App app{"rlhf: RLHF (pretraining, SFT, reward models, PPO) on GPT-2-architecture models"};
  app.require_subcommand(1);
  namespace pl = rlhf::pipeline;

  ConfigArgs pipeline_args, pretrain_args, sft_args, reward_args, ppo_args, eval_args;
  auto* pipeline = app.add_subcommand(
      "pipeline", "the whole recipe: pretrain, label pairs with a rule, reward model, PPO, gold-vs-proxy report");
  add_config_options(pipeline, pipeline_args, false, true);
  std::string pipeline_model;
  pipeline->add_option("--model", pipeline_model, "start from this Hugging Face GPT-2 folder instead of a fresh "
                                                  "tiny model");
  auto* pretrain = app.add_subcommand("pretrain", "next-token training on a text corpus");
  add_config_options(pretrain, pretrain_args, false, true);
  auto* sft = app.add_subcommand("sft", "supervised fine-tuning on prompt/completion pairs (JSONL)");
  add_config_options(sft, sft_args, false, true);
  auto* reward = app.add_subcommand("reward", "train a reward model on preference pairs (JSONL)");
  add_config_options(reward, reward_args, false, true);
  auto* ppo = app.add_subcommand("ppo", "PPO of a policy against a reward model or a word-list rule");
  add_config_options(ppo, ppo_args, false, true);
  ConfigArgs sweep_args;
  auto* sweep = app.add_subcommand("sweep", "hyperparameter search over PPO runs: grid, random or Bayesian "
                                            "(Gaussian process), resumable");
  add_config_options(sweep, sweep_args, false, true);
  auto* eval = app.add_subcommand("eval", "perplexity, reward-model accuracy, or scores of samples, as JSON");
  add_config_options(eval, eval_args, false, false);
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
  std::string generate_config;
  std::vector<std::string> generate_overrides;
  generate->add_option("--config", generate_config, "TOML or JSON file with a [sampling] table (SamplingConfig)");
  generate->add_option("--set,-s", generate_overrides, "override a sampling key: --set sampling.top_p=0.9")
      ->take_all();
  GenerateArgs gen;
  generate->add_option("--model", gen.model, "Hugging Face GPT-2 folder")->required();
  generate->add_option("--tokenizer", gen.tokenizer, "tokenizer folder (default: the model folder)");
  generate->add_option("--prompt", gen.prompt, "text to continue")->required();
  // Sampling flags win over the config file: each given flag becomes an override of its sampling key.
  std::vector<std::pair<CLI::Option*, std::string>> sampling_flags = {
      {generate->add_option("--max-new-tokens", gen.sampling.max_new_tokens, "tokens to generate")
           ->capture_default_str(), "max_new_tokens"},
      {generate->add_option("--temperature", gen.sampling.temperature, "0 = greedy")->capture_default_str(),
       "temperature"},
      {generate->add_option("--top-k", gen.sampling.top_k, "0 = off")->capture_default_str(), "top_k"},
      {generate->add_option("--top-p", gen.sampling.top_p, "1 = off")->capture_default_str(), "top_p"},
      {generate->add_option("--seed", gen.sampling.seed, "random seed")->capture_default_str(), "seed"}};
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
    if (*pipeline) {
      pl::MainJobConfig defaults;
      if (!pipeline_model.empty()) defaults.model.path = pipeline_model;
      return run_configured(pipeline_args, [&](const pl::MainJobConfig& c) {
        auto report = pl::run_main_job(c, pipeline_args.resume);
        fmt::print("{}", report);
        return report.starts_with("interrupted") ? 130 : 0;
      }, defaults);
    }
    if (*pretrain)
      return run_configured<pl::PretrainConfig>(pretrain_args, [&](const auto& c) {
        return stage_status(pl::run_pretrain(c, pretrain_args.resume));
      });
    if (*sft)
      return run_configured<pl::SFTConfig>(sft_args, [&](const auto& c) {
        return stage_status(pl::run_sft(c, sft_args.resume));
      });
    if (*reward)
      return run_configured<pl::RewardConfig>(reward_args, [&](const auto& c) {
        return stage_status(pl::run_reward(c, reward_args.resume));
      });
    if (*ppo)
      return run_configured<pl::PPORunConfig>(ppo_args, [&](const auto& c) {
        return stage_status(pl::run_ppo(c, ppo_args.resume));
      });
    if (*sweep) return run_sweep_command(sweep_args);
    if (*eval)
      return run_configured<pl::EvalConfig>(eval_args, [&](const auto& c) {
        fmt::print("{}\n", pl::run_eval(c).dump(2));
        return 0;
      });
    if (*generate && (!generate_config.empty() || !generate_overrides.empty())) {
      nlohmann::json json = generate_config.empty() ? nlohmann::json::object()
                                                    : rlhf::config::load_config_file(generate_config);
      rlhf::config::apply_overrides(json, generate_overrides);
      const auto flags = rlhf::config::to_json_config(gen.sampling);
      for (const auto& [option, key] : sampling_flags)
        if (option->count() > 0) json["sampling"][key] = flags[key];
      for (const auto& [key, value] : json.items())
        if (key != "sampling")
          rlhf::detail::fail("{}: unknown key '{}' (generate reads only the [sampling] table; the other settings are "
                             "flags)",
                             generate_config.empty() ? std::string("--set") : generate_config, key);
      if (json.contains("sampling"))
        rlhf::config::bind_config(json["sampling"], gen.sampling,
                                  generate_config.empty() ? std::string("--set") : generate_config, "sampling");
    }
    if (*tokenize) run_tokenize(tokenizer_dir, special);
    if (*forward) run_forward(model_dir, ids, out, device);
    if (*generate) run_generate(gen);
    if (*init) run_init(init_out, init_config, seed);
  } catch (const rlhf::Error& e) {
    fmt::print(stderr, "rlhf: error: {}\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    fmt::print(stderr, "rlhf: error (torch): {}\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "rlhf: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
