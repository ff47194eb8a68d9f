// One PPO phase through the library's own PPOTrainer (GPT2Policy: GPT-2 + MLP value head, full fine-tuning, KL in
// the loss as the seed notebook does), stage by stage: seconds, tokens/s, achieved TFLOP/s, the share of this
// machine's matmul ceiling, the floor (FLOPs over the ceiling plus bytes over the copy bandwidth) and peak memory
// (resident memory on the CPU; torch's allocations on a CUDA device). The ceiling (per dtype) and the bandwidth are
// measured on the same device in the same run, after the phase. Then sampling at batch 1 and its distance from the
// memory-bandwidth floor. benchmarks/python/ppo_phase.py runs the same phase in PyTorch eager;
// benchmarks/python/compare.py runs both and prints the ratios.
//
// Times are the last phase's (the earlier ones warm up allocators and caches); per-stage peak memory is the first
// phase's (VmRSS, or on a GPU torch's allocated bytes, sampled every millisecond on a thread, the stage windows taken
// from PhaseStats), the phase's peak is VmHWM (GPU: the allocator's peak) over all phases.
//
//   ppo_phase [--shape small|tiny] [--precision fp32|bf16|auto] [--device cpu|cuda] [--prompts 32] [--prompt-tokens 16]
//             [--new-tokens 50] [--minibatches 4] [--epochs 2] [--phases 2] [--seed 1] [--threads N] [--json PATH]
//             [--no-batch1]

#include <chrono>
#include <fstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <rlhf/rlhf.hpp>

#include "bench_util.hpp"

namespace {

namespace bench = rlhf::bench;

/// GPT-2-small (124M parameters + a 2.4M-parameter value head) or a tiny model for quick checks.
rlhf::GPT2Config shape_config(const std::string& shape) {
  if (shape == "tiny") return {.vocab_size = 1024, .n_embd = 64, .n_layer = 2, .n_head = 4};
  return {.vocab_size = 50257, .n_embd = 768, .n_layer = 12, .n_head = 12};
}

struct Args {
  std::string shape = "small", precision = "auto", device = "cpu", json_path, memory_trace_path;
  int64_t prompts = 32, prompt_tokens = 16, new_tokens = 50, minibatches = 4, epochs = 2, phases = 2;
  uint64_t seed = 1;
  int threads = 0;
  bool batch1 = true;
  bool recompute_old_logprobs = false;
};

int64_t numel(const std::vector<torch::Tensor>& params) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

// ---- FLOPs per stage (matmuls only, 2 per multiply-add; the work the phase needs, the same count for every
// implementation so that TFLOP/s compare) ----
//
// B prompts of P tokens (BOS included), G new tokens, T = P + G, mb = B / minibatches, U = minibatches x epochs.
//   generation: the prompt forward (B x P tokens, context P), G - 1 one-token forwards (context P + 1 ... P + G - 1),
//               the vocabulary projection and the value head of the last position at each of the G steps: the
//               policy's old log-probs and values need no other forward.
//   reference:  the reference forward over B x (T - 1) tokens: the last token predicts no generated token, and
//               the causal attention leaves the other positions as they are without it. Its log-probs of the G
//               generated positions (for the KL statistic) come from the training's projections of the same rows
//               (below), which the KL term in the loss needs anyway. (A second policy forward for the old log-probs,
//               as the seed notebook and --recompute-old-logprobs run, is work the phase does not need and is not
//               counted.)
//   reward:     none (a text function).
//   training:   per update, forward + backward (3x the forward) of the policy over mb x (T - 1) tokens, the value
//               head and the vocabulary projection at mb x G positions, plus the reference vocabulary projection of
//               the same positions for the full-vocabulary KL term (forward only).
struct StageFlops {
  double generation = 0, reference = 0, training = 0;
};

StageFlops phase_flops(const rlhf::GPT2Config& c, const Args& a) {
  const double b = a.prompts, p = a.prompt_tokens, g = a.new_tokens, t = p + g;
  const double mb = b / a.minibatches, updates = a.minibatches * a.epochs;
  StageFlops f;
  f.generation = bench::block_flops(c, b * p, p) + bench::vocab_flops(c, b * g) + bench::value_head_flops(c, b * g);
  for (int64_t s = 1; s < a.new_tokens; ++s) f.generation += bench::block_flops(c, b, p + s);
  f.reference = bench::block_flops(c, b * (t - 1), t - 1);
  const double forward = bench::block_flops(c, mb * (t - 1), t - 1) + bench::value_head_flops(c, mb * g) +
                         bench::vocab_flops(c, mb * g);
  f.training = updates * (3 * forward + bench::vocab_flops(c, mb * g));
  return f;
}

// ---- memory accounting (MiB) ----

/// What a phase must hold, item by item: the bound its peak RSS is compared with.
nlohmann::json memory_accounting(const rlhf::GPT2Config& c, const Args& a, bool bf16, bool autocast_copies,
                                 bool fp32_panels, double runtime_mb, int64_t policy_params, int64_t reference_params,
                                 int64_t trainable) {
  constexpr double kMiB = 1024.0 * 1024.0;
  const double d = c.n_embd, h = c.n_head, l = c.n_layer, v = c.vocab_size;
  const double p = a.prompt_tokens, g = a.new_tokens, t = p + g, b = a.prompts, mb = b / a.minibatches;
  // Tensors autograd keeps per layer and token: fp32 keeps the layernorm inputs (2D), their outputs (2D), q/k/v
  // (3D), the attention output (D), the MLP's c_fc output and GELU output (8D) = 16D floats, plus the fp32
  // attention probabilities (H x T). Under bf16 autocast the layernorm inputs stay fp32 (8D bytes), the other 14D
  // are bf16 (28D bytes); the fused attention of the bf16 kernels keeps the probabilities in fp32 (4 H T bytes;
  // rlhf/core/attention.hpp), torch's composition (where torch runs the bf16 products) in fp32 and as their bf16
  // cast (6 H T bytes).
  const double probabilities = (bf16 && autocast_copies ? 6 : 4) * h * t;
  const double per_token_layer = (bf16 ? 36 * d : 64 * d) + probabilities;
  const double blocks = l * mb * t * per_token_layer;
  // Full-vocabulary tensors [mb, G, V]: the policy's logits and the reference's, kept by projected_token_stats in
  // the product's dtype (bf16 under autocast); their gradient overwrites the policy's logits, and the log-softmax,
  // probabilities and their products exist one row chunk at a time.
  const double vocab = 2.0 * (bf16 ? 2 : 4) * mb * g * v;
  const double head = mb * g * 4 * d * 4 * 2;  // value head hidden pre/post ReLU
  const double kv_cache = 2 * l * b * t * d * (bf16 ? 2 : 4);  // under autocast the cache holds bf16 keys/values
  const double rollout = b * g * d * 4 + 8 * b * g * 4 + 2 * b * t * 8;  // ref hidden, [B, G] floats, ids + mask
  // Copies of the policy's weights made for sampling. bf16: torch's autocast caches one of each weight it casts
  // (for a forward's graph, and while it samples); the library's bf16 kernels make none for training but pack each
  // layer matrix and wte to bf16 once per rollout (DecodePackScope). fp32 on AVX-512: the layer matrices packed in
  // panels once per rollout (wte is read in place).
  const double packed = bf16 ? 2 * (l * 12 * d * d + v * d) : fp32_panels ? 4 * l * 12 * d * d : 0.0;
  nlohmann::json items = {
      {"runtime_mb", runtime_mb},
      {"policy_weights_mb", policy_params * 4 / kMiB},
      {"reference_weights_mb", reference_params * 4 / kMiB},
      {"gradients_mb", trainable * 4 / kMiB},
      {"adamw_state_mb", 2.0 * trainable * 4 / kMiB},
      {"decode_weight_copies_mb", bf16 && autocast_copies ? policy_params * 2 / kMiB : packed / kMiB},
      {"activations_one_minibatch_mb", (blocks + vocab + head) / kMiB},
      {"kv_cache_mb", kv_cache / kMiB},
      {"rollout_buffers_mb", rollout / kMiB}};
  double total = 0;
  for (const auto& [key, value] : items.items()) total += value.get<double>();
  items["bound_mb"] = total;
  return items;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"One PPO phase of the library, stage by stage, with the machine's matmul ceiling and bandwidth"};
  Args a;
  app.add_option("--shape", a.shape, "small (GPT-2-small: 12 x 768, 12 heads, vocab 50257) or tiny")
      ->check(CLI::IsMember({"small", "tiny"}))
      ->capture_default_str();
  app.add_option("--precision", a.precision, "fp32, bf16 (autocast) or auto (the library's default: bf16 where the "
                                             "device computes bf16 products natively)")
      ->check(CLI::IsMember({"fp32", "bf16", "auto"}))
      ->capture_default_str();
  app.add_option("--device", a.device, "cpu, cuda, cuda:1, ...")->capture_default_str();
  app.add_option("--prompts", a.prompts, "prompts per phase")->capture_default_str();
  app.add_option("--prompt-tokens", a.prompt_tokens, "tokens per prompt, BOS included")->capture_default_str();
  app.add_option("--new-tokens", a.new_tokens, "tokens generated per prompt")->capture_default_str();
  app.add_option("--minibatches", a.minibatches)->capture_default_str();
  app.add_option("--epochs", a.epochs, "passes over the phase's samples")->capture_default_str();
  app.add_option("--phases", a.phases, "phases run; only the last is measured")->capture_default_str();
  app.add_option("--seed", a.seed)->capture_default_str();
  app.add_option("--threads", a.threads, "0 = all cores");
  app.add_option("--json", a.json_path, "also write the JSON result to this file");
  app.add_option("--memory-trace", a.memory_trace_path,
                 "write every memory sample (ms apart) and each minibatch update's begin, gradients and end to this "
                 "CSV file: seconds,memory_mb,heap_in_use_mb,heap_free_mb,event");
  app.add_flag("!--no-batch1", a.batch1, "skip the batch-1 sampling measurement");
  app.add_flag("--recompute-old-logprobs", a.recompute_old_logprobs,
               "a second policy forward for the old log-probs and values (PPOConfig::recompute_old_logprobs)");
  rlhf::DecodeIsa isa_cap = rlhf::DecodeIsa::avx512_bf16;
  rlhf::bench::add_decode_isa_option(app, isa_cap);
  CLI11_PARSE(app, argc, argv);
  rlhf::set_decode_isa(isa_cap);
  if (a.prompt_tokens < 2 || a.prompts % a.minibatches != 0 || a.phases < 1) {
    fmt::print(stderr, "ppo_phase: need --prompt-tokens >= 2, --prompts divisible by --minibatches, --phases >= 1\n");
    return 2;
  }

  auto runtime = rlhf::configure_runtime({.threads = a.threads});
  if (auto w = runtime.warning(); !w.empty()) fmt::print("{}\n", w);
  torch::Device device = torch::kCPU;
  try {
    device = rlhf::pipeline::parse_device(a.device, "--device");
  } catch (const rlhf::Error& e) {
    fmt::print(stderr, "ppo_phase: {}\n", e.what());
    return 2;
  }
  const bool gpu = device.is_cuda();
  if (gpu && !torch::cuda::is_available()) {
    fmt::print(stderr, "ppo_phase: --device {}: no CUDA device is available\n", a.device);
    return 2;
  }
  if (gpu && !bench::kDeviceMemoryStats)
    fmt::print("ppo_phase: this build cannot read the CUDA allocator's statistics: GPU memory is reported as 0\n");
  // Memory is resident memory on the CPU and torch's allocations on a GPU.
  auto memory_now = [&] { return gpu ? bench::device_allocated_mb(device) : bench::rss_mb(); };
  const double runtime_mb = memory_now();
  // The precision the phase runs in: auto resolved for the device, as the trainer resolves it.
  const auto precision = rlhf::resolve_precision(rlhf::parse_precision(a.precision, "--precision"), device);
  a.precision = rlhf::to_string(precision);
  const bool bf16 = precision == rlhf::Precision::bf16;
  const rlhf::GPT2Config gpt2 = shape_config(a.shape);

  // ---- the trainer, as a user builds it ----
  rlhf::PPOConfig config{.seed = a.seed,
                         .batch_size = a.prompts,
                         .num_minibatches = a.minibatches,
                         .batches_per_learning_phase = a.epochs,
                         .gen_len = a.new_tokens,
                         .prepend_bos = true,
                         .precision = precision,
                         .recompute_old_logprobs = a.recompute_old_logprobs};
  config.total_phases = std::max<int64_t>(config.total_phases, a.phases + config.warmup_steps + 1);
  auto reward = rlhf::FunctionReward([](const std::string& text) { return bench::letter_e_share(text); });
  torch::manual_seed(static_cast<int64_t>(a.seed));
  rlhf::GPT2<> base(gpt2);
  base->place(device, torch::kFloat);
  rlhf::GPT2Policy policy{base};
  rlhf::PPOTrainer<rlhf::GPT2Policy, decltype(reward), rlhf::AdaptiveKL> trainer(
      policy, reward, config, bench::placeholder_tokenizer(gpt2.vocab_size));
  const auto prompts = bench::letter_prompts(a.prompts, a.prompt_tokens - 1);  // + BOS
  const int64_t policy_params = numel(policy->parameters());
  const int64_t reference_params = numel(trainer.reference()->parameters());
  const int64_t trainable = numel(policy->base_parameters()) + numel(policy->head_parameters());

  // ---- the phases: the first is the one that grows memory (per-stage peak RSS is read from it: malloc keeps
  // freed memory, so later phases start at the first one's high-water mark); the last one is timed ----
  struct PhaseRun {
    rlhf::PhaseStats stats;
    double from = 0, to = 0;  // seconds after the sampler's start
  };
  std::vector<PhaseRun> runs;
  bench::reset_peak_rss();
  bench::reset_device_peak(device);
  bench::MemorySampler sampler(std::chrono::microseconds(1000), memory_now, /*heap=*/!gpu);
  // The times of each minibatch update's stages, for --memory-trace.
  struct UpdateEvents : rlhf::StepCallback {
    const bench::MemorySampler* sampler = nullptr;
    std::vector<std::pair<double, std::string>> events;
    void mark(const rlhf::StepInfo& info, const char* what) {
      events.emplace_back(sampler->offset(std::chrono::steady_clock::now()), fmt::format("{} {}", what, info.step));
    }
    void on_step_begin(const rlhf::StepInfo& info) override { mark(info, "update"); }
    void on_gradients(const rlhf::StepInfo& info) override { mark(info, "gradients"); }
    void on_step_end(const rlhf::StepInfo& info) override { mark(info, "updated"); }
  };
  auto update_events = std::make_shared<UpdateEvents>();
  update_events->sampler = &sampler;
  if (!a.memory_trace_path.empty()) trainer.add_callback(update_events);
  for (int64_t i = 0; i < a.phases; ++i) {
    PhaseRun run;
    run.from = sampler.offset(std::chrono::steady_clock::now());
    run.stats = trainer.step(prompts);
    run.to = sampler.offset(std::chrono::steady_clock::now());
    runs.push_back(std::move(run));
  }
  sampler.stop();
  if (!a.memory_trace_path.empty()) {
    std::string csv = "seconds,memory_mb,heap_in_use_mb,heap_free_mb,event\n";
    auto event = update_events->events.begin();
    for (const auto& sample : sampler.samples()) {
      for (; event != update_events->events.end() && event->first <= sample.t; ++event)
        csv += fmt::format("{:.4f},,,,{}\n", event->first, event->second);
      csv += sample.has_heap ? fmt::format("{:.4f},{:.1f},{:.1f},{:.1f},\n", sample.t, sample.mb,
                                           sample.heap.in_use_mb, sample.heap.free_mb)
                             : fmt::format("{:.4f},{:.1f},,,\n", sample.t, sample.mb);
    }
    rlhf::write_file_atomic(a.memory_trace_path, csv);
  }
  const double phase_peak_mb = gpu ? bench::device_allocated_mb(device, true) : bench::peak_rss_mb();
  const rlhf::PhaseStats& stats = runs.back().stats;

  // ---- sampling at batch 1, in the phase's precision ----
  nlohmann::json batch1;
  double batch1_seconds = 0;
  if (a.batch1) {
    auto prompt = trainer.tokenizer().encode(prompts.front());
    prompt.insert(prompt.begin(), trainer.tokenizer().eos_id());
    auto ids = torch::tensor(prompt, torch::kLong).unsqueeze(0).to(device);  // [1, P]
    rlhf::SamplingConfig sampling{.max_new_tokens = a.new_tokens, .seed = a.seed};
    rlhf::AutocastScope autocast(config.precision, device);
    // As an interactive program samples: the weights packed for the decode kernels once, kept between calls (the
    // floor counts the bytes each token reads; the warm-up call packs them)
    rlhf::DecodePackScope packs;
    rlhf::generate(*policy->base, ids, {}, {.max_new_tokens = 2, .seed = a.seed});  // warm-up
    rlhf::synchronize(device);
    const auto start = std::chrono::steady_clock::now();
    rlhf::generate(*policy->base, ids, {}, sampling);
    rlhf::synchronize(device);
    batch1_seconds = bench::seconds_since(start);
  }

  // ---- the machine, measured after the phase so its buffers do not count in the phase's RSS ----
  const double bandwidth = bench::copy_bandwidth(device);
  // The ceiling is the machine's, probed at GPT-2-small widths (or wider) whatever the shape benchmarked: a tiny
  // model's small GEMMs reach only a fraction of it, and that is what the %ceil column should show.
  const int64_t mb_rows = a.prompts / a.minibatches * (a.prompt_tokens + a.new_tokens);
  const int64_t probe_width = std::max<int64_t>(gpt2.n_embd, 768);
  std::vector<bench::MatmulPoint> fp32_points, bf16_points;
  const double ceiling_fp32 = bench::matmul_ceiling(torch::kFloat, probe_width, mb_rows, &fp32_points, device);
  const double ceiling_bf16 = bench::matmul_ceiling(torch::kBFloat16, probe_width, mb_rows, &bf16_points, device);
  const double ceiling = bf16 ? ceiling_bf16 : ceiling_fp32;

  // ---- per-stage numbers ----
  const StageFlops flops = phase_flops(gpt2, a);
  const double matmul_bytes = bf16 ? 2.0 : 4.0;
  const int64_t base_params = numel(policy->base->parameters());
  // Bytes a stage must move at least: every weight once per decoding step (in the matmul dtype); AdamW reads
  // parameter, gradient and both moments and writes parameter and moments (7 fp32 values per parameter) per step.
  const double gen_bytes = static_cast<double>(a.new_tokens) * base_params * matmul_bytes;
  const double adam_bytes = static_cast<double>(a.minibatches * a.epochs) * 7.0 * 4.0 * trainable;
  const double b = a.prompts, g = a.new_tokens, t = a.prompt_tokens + a.new_tokens;
  const double mb = b / a.minibatches;
  struct Stage {
    std::string name;
    double seconds, flops, bytes, tokens;
    double peak_mb = 0;
  };
  std::vector<Stage> stages = {
      {"generation", stats.seconds_generation, flops.generation, gen_bytes, b * g},
      {"reward", stats.seconds_reward, 0.0, 0.0, b * g},
      {"reference", stats.seconds_reference, flops.reference, 0.0, (a.recompute_old_logprobs ? 2 : 1) * b * t},
      {"training", stats.seconds_training, flops.training, adam_bytes,
       static_cast<double>(a.minibatches * a.epochs) * mb * t}};
  {
    // Stage windows of the first phase: generation, reward and reference run back to back from its start;
    // training ends with it.
    const auto& first = runs.front();
    const double gen_end = first.from + first.stats.seconds_generation;
    const double reward_end = gen_end + first.stats.seconds_reward;
    stages[0].peak_mb = sampler.max_between(first.from, gen_end);
    stages[1].peak_mb = sampler.max_between(gen_end, reward_end);
    stages[2].peak_mb = sampler.max_between(reward_end, reward_end + first.stats.seconds_reference);
    stages[3].peak_mb = sampler.max_between(first.to - first.stats.seconds_training, first.to);
  }

  fmt::print("rlhf ppo_phase: shape {} ({} layers, {} wide, {} heads, vocab {}), {} on {}, {} threads, BLAS {}, "
             "malloc {}\n",
             a.shape, gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.vocab_size, a.precision, device.str(),
             runtime.threads, runtime.blas_is_openmp_openblas ? "OpenMP OpenBLAS" : runtime.blas, runtime.allocator);
  fmt::print("{} prompts x {} tokens, {} new tokens, {} minibatches x {} epochs; copy bandwidth {:.1f} GB/s, "
             "matmul ceiling fp32 {:.3f} / bf16 {:.3f} TFLOP/s\n",
             a.prompts, a.prompt_tokens, a.new_tokens, a.minibatches, a.epochs, bandwidth / 1e9, ceiling_fp32 / 1e12,
             ceiling_bf16 / 1e12);
  fmt::print("{:<11} {:>9} {:>10} {:>8} {:>9} {:>7} {:>9} {:>8} {:>9}\n", "stage", "seconds", "tokens/s", "TFLOP",
             "TFLOP/s", "%ceil", "floor s", "x floor", "peak MB");
  nlohmann::json stage_json = nlohmann::json::object();
  double total_seconds = 0, total_flops = 0, total_floor = 0;
  for (const auto& s : stages) {
    const double floor = s.flops / ceiling + s.bytes / bandwidth;
    const double tflops = s.seconds > 0 ? s.flops / s.seconds / 1e12 : 0.0;
    const double peak = s.peak_mb;
    total_seconds += s.seconds;
    total_flops += s.flops;
    total_floor += floor;
    fmt::print("{:<11} {:>9.3f} {:>10.1f} {:>8.3f} {:>9.3f} {:>6.1f}% {:>9.3f} {:>8.1f} {:>9.0f}\n", s.name, s.seconds,
               s.tokens / s.seconds, s.flops / 1e12, tflops, 100.0 * tflops * 1e12 / ceiling, floor,
               floor > 0 ? s.seconds / floor : 0.0, peak);
    stage_json[s.name] = {{"seconds", s.seconds}, {"tokens_per_s", s.tokens / s.seconds},
                          {"tflop", s.flops / 1e12}, {"tflops", tflops},
                          {"fraction_of_ceiling", tflops * 1e12 / ceiling}, {"floor_seconds", floor},
                          {"x_floor", floor > 0 ? s.seconds / floor : 0.0}, {"peak_rss_mb", peak}};
  }
  const double phase_tflops = total_flops / total_seconds / 1e12;
  fmt::print("{:<11} {:>9.3f} {:>10.1f} {:>8.3f} {:>9.3f} {:>6.1f}% {:>9.3f} {:>8.1f} {:>9.0f}\n", "phase",
             total_seconds, b * g / total_seconds, total_flops / 1e12, phase_tflops,
             100 * phase_tflops * 1e12 / ceiling,
             total_floor, total_seconds / total_floor, phase_peak_mb);

  // Whether bf16 products run on torch's autocast (which caches bf16 weight copies) or on the library's kernels.
  const auto weight = torch::empty({0}, torch::TensorOptions().device(device));  // asks the library, by device
  const bool autocast_copies = bf16 && !rlhf::gemm_bf16_supported({&weight});
  const bool fp32_panels = !bf16 && !gpu && rlhf::decode_isa() >= rlhf::DecodeIsa::avx512;
  auto memory = memory_accounting(gpt2, a, bf16, autocast_copies, fp32_panels, runtime_mb, policy_params,
                                  reference_params, trainable);
  memory["peak_rss_mb"] = phase_peak_mb;
  // What the largest sample of resident memory was made of: the bytes the program held on malloc's heap (compare
  // with the accounted items), the process as it started (libraries, the runtime), and the rest: under tcmalloc,
  // the freed memory it kept (resident: it only holds pages earlier allocations touched) and what lies outside
  // malloc (thread stacks, OpenBLAS's buffers, mappings of libraries touched later). glibc's free-byte count
  // includes chunks never touched, so under glibc the rest is not split.
  const auto at_peak = sampler.peak();
  const bool tcmalloc = runtime.allocator == "tcmalloc";
  const double accounted_items_mb = memory["bound_mb"].get<double>() - runtime_mb;
  const double rest_mb = at_peak.mb - runtime_mb - at_peak.heap.in_use_mb;
  const double kept_mb = tcmalloc ? at_peak.heap.free_mb : 0.0, outside_mb = rest_mb - kept_mb;
  const double max_heap_mb = sampler.max_heap_in_use();
  if (!gpu) {
    memory["sampled_peak_rss_mb"] = at_peak.mb;
    memory["max_heap_in_use_mb"] = max_heap_mb;
    memory["heap_in_use_at_peak_mb"] = at_peak.heap.in_use_mb;
    memory["accounted_items_mb"] = accounted_items_mb;
    memory["resident_beyond_heap_in_use_at_peak_mb"] = rest_mb;
    if (tcmalloc) {
      memory["malloc_free_at_peak_mb"] = kept_mb;
      memory["outside_malloc_at_peak_mb"] = outside_mb;
    }
  }
  fmt::print("memory (MiB): runtime {:.0f} + policy {:.0f} + reference {:.0f} + gradients {:.0f} + AdamW {:.0f} + "
             "decode weight copies {:.0f} + activations of one minibatch {:.0f} + KV cache {:.0f} + rollout {:.0f} = "
             "{:.0f}; measured peak {:.0f} ({:.2f} of the bound)\n",
             memory["runtime_mb"].get<double>(), memory["policy_weights_mb"].get<double>(),
             memory["reference_weights_mb"].get<double>(), memory["gradients_mb"].get<double>(),
             memory["adamw_state_mb"].get<double>(), memory["decode_weight_copies_mb"].get<double>(),
             memory["activations_one_minibatch_mb"].get<double>(), memory["kv_cache_mb"].get<double>(),
             memory["rollout_buffers_mb"].get<double>(), memory["bound_mb"].get<double>(), phase_peak_mb,
             phase_peak_mb / memory["bound_mb"].get<double>());

  if (!gpu && at_peak.heap.in_use_mb > 0) {
    const std::string rest =
        tcmalloc ? fmt::format("freed memory tcmalloc kept {:.0f} + outside malloc {:.0f}", kept_mb, outside_mb)
                 : std::string("freed memory malloc kept, thread stacks, mappings outside malloc");
    fmt::print("at the sampled peak ({:.0f} MiB resident): runtime {:.0f} + malloc heap in use {:.0f} + the rest "
               "{:.0f} ({}); the most the heap held at once: {:.0f}, against {:.0f} of accounted items\n",
               at_peak.mb, runtime_mb, at_peak.heap.in_use_mb, rest_mb, rest, max_heap_mb, accounted_items_mb);
  }

  if (a.batch1) {
    // A decoding step at batch 1 reads every weight once: its floor is weight bytes (matmul dtype) / bandwidth.
    const double floor_ms = 1e3 * static_cast<double>(base_params) * matmul_bytes / bandwidth;
    const double ms = 1e3 * batch1_seconds / static_cast<double>(a.new_tokens);
    batch1 = {{"tokens_per_s", a.new_tokens / batch1_seconds}, {"ms_per_token", ms},
              {"bandwidth_floor_ms_per_token", floor_ms}, {"x_floor", ms / floor_ms}};
    fmt::print("sampling at batch 1: {:.1f} tokens/s, {:.2f} ms/token, floor {:.2f} ms/token ({:.2f}x)\n",
               a.new_tokens / batch1_seconds, ms, floor_ms, ms / floor_ms);
  }

  auto points_json = [](const std::vector<bench::MatmulPoint>& points) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& p : points)
      out.push_back({{"m", p.m}, {"k", p.k}, {"n", p.n}, {"tflops", p.flops / 1e12},
                     {"library_tflops", p.library_flops / 1e12}});
    return out;
  };
  nlohmann::json result = {
      {"benchmark", "ppo_phase"},
      {"implementation", "rlhf"},
      {"shape", a.shape},
      {"precision", a.precision},
      {"default_precision", rlhf::to_string(rlhf::resolve_precision(rlhf::Precision::automatic, device))},
      {"device", device.str()},
      {"threads", runtime.threads},
      {"decode_isa", rlhf::bench::decode_isa_name(rlhf::decode_isa())},
      {"allocator", runtime.allocator},
      {"prompts", a.prompts},
      {"prompt_tokens", a.prompt_tokens},
      {"new_tokens", a.new_tokens},
      {"minibatches", a.minibatches},
      {"epochs", a.epochs},
      {"parameters", policy_params},
      {"copy_bandwidth_gb_s", bandwidth / 1e9},
      {"ceiling_tflops", {{"fp32", ceiling_fp32 / 1e12}, {"bf16", ceiling_bf16 / 1e12}}},
      {"ceiling_points", {{"fp32", points_json(fp32_points)}, {"bf16", points_json(bf16_points)}}},
      {"stages", stage_json},
      {"phase",
       {{"seconds", total_seconds},
        {"tflops", phase_tflops},
        {"fraction_of_ceiling", phase_tflops * 1e12 / ceiling},
        {"floor_seconds", total_floor},
        {"x_floor", total_seconds / total_floor},
        {"peak_rss_mb", phase_peak_mb}}},
      {"memory", memory},
      {"memory_measure", gpu ? "CUDA allocations" : "resident set"},
      {"kl", stats.kl},
      {"updates", stats.updates}};
  if (a.batch1) result["generation_batch1"] = batch1;
  fmt::print("{}\n", result.dump());
  if (!a.json_path.empty()) std::ofstream(a.json_path) << result.dump(2) << "\n";
}
