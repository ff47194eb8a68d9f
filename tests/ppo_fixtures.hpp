#pragma once
// What several test files build the same way: the digit-count reward, a tiny byte-level PPO policy and the settings
// under which it learns, the interrupted-and-resumed PPO runs, and the PPO run the shift-recorder tests record. The
// CPU tests and tests/cuda use the same fixtures with another device.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <rlhf/rlhf.hpp>

namespace rlhf::test {

/// Reward: the number of decimal digits in the completion.
inline double count_digits(const std::string& text) {
  return static_cast<double>(std::count_if(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }));
}

/// A tiny GPT-2 policy with the MLP value head over the byte-level vocabulary (257 tokens): 2 layers, 4 heads,
/// 32 wide, 64 positions, BOS = EOS = <|endoftext|>; weights drawn from `seed`, placed on `device`.
inline ActorCritic<> tiny_byte_policy(uint64_t seed, torch::Device device = torch::kCPU) {
  auto tokenizer = GPT2Tokenizer::byte_level();
  torch::manual_seed(static_cast<int64_t>(seed));
  GPT2<> base(GPT2Config{.vocab_size = tokenizer.vocab_size(), .n_positions = 64, .n_embd = 32, .n_layer = 2,
                         .n_head = 4, .bos_token_id = tokenizer.eos_id(), .eos_token_id = tokenizer.eos_id()});
  base->place(device, torch::kFloat);
  return ActorCritic<>(base);
}

/// PPO settings under which tiny_byte_policy learns count_digits within 30 phases: 32 samples of 12 tokens after
/// "n", 4 minibatches x 2 epochs, learning rates 3e-3, KL coefficient 0.2 (in the reward), GAE lambda 0.95.
inline PPOConfig digit_learning_config() {
  return {.seed = 3, .total_phases = 40, .batch_size = 32, .num_minibatches = 4, .batches_per_learning_phase = 2,
          .base_lr = 3e-3, .head_lr = 3e-3, .warmup_steps = 2, .final_scale = 0.5, .gen_len = 12, .top_k = 0,
          .prefix = "n", .kl_coef = 0.2, .lambda = 0.95, .kl_placement = KLPlacement::reward};
}

/// The settings of the resume tests: digit_learning_config() with 8 samples in 2 minibatches, 4 phases.
inline PPOConfig resume_config() {
  auto config = digit_learning_config();
  config.total_phases = 4;
  config.batch_size = 8;
  config.num_minibatches = 2;
  return config;
}

using ResumeTrainer = PPOTrainer<ActorCritic<>, FunctionReward<double (*)(const std::string&)>, AdaptiveKL>;

/// A trainer of the resume tests: tiny_byte_policy(4) on `device`, count_digits, an adaptive KL controller.
inline ResumeTrainer resume_trainer(torch::Device device, const PPOConfig& config = resume_config()) {
  return ResumeTrainer(tiny_byte_policy(4, device), FunctionReward(&count_digits), config,
                       GPT2Tokenizer::byte_level());
}

/// Two runs of resume_trainer(device): four phases straight, and two phases, save_state into `dir`, load_state into
/// a fresh trainer (the same starting model: its frozen copy is the reference), two more phases.
struct ResumeRuns {
  std::vector<PhaseStats> straight;  ///< phases 0-3
  std::vector<PhaseStats> resumed;   ///< phases 2-3 of the resumed trainer
  int64_t loaded_step = -1;          ///< the resumed trainer's step count right after load_state
  std::map<std::string, torch::Tensor> straight_parameters, resumed_parameters;  ///< after the last phase
};

inline ResumeRuns resume_runs(torch::Device device, const std::filesystem::path& dir) {
  ResumeRuns runs;
  auto parameters = [](ResumeTrainer& trainer) {
    std::map<std::string, torch::Tensor> out;
    for (const auto& item : trainer.policy()->named_parameters()) out.emplace(item.key(), item.value());
    return out;
  };
  ResumeTrainer straight = resume_trainer(device);
  for (int i = 0; i < 4; ++i) runs.straight.push_back(straight.step());
  runs.straight_parameters = parameters(straight);
  {
    ResumeTrainer first = resume_trainer(device);
    first.step();
    first.step();
    first.save_state(dir);
  }
  ResumeTrainer resumed = resume_trainer(device);
  resumed.load_state(dir);
  runs.loaded_step = resumed.step_count();
  for (int i = 2; i < 4; ++i) runs.resumed.push_back(resumed.step());
  runs.resumed_parameters = parameters(resumed);
  return runs;
}

/// Largest |a - b| relative to max |b| (on the tensors' device).
inline double rel_error(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a - b).abs().max().item<double>() / std::max(scale, 1e-30);
}

/// The tolerance of "the shares sum to the applied update" for tensor `name`, relative to the largest update: 1e-5,
/// but 1e-4 for layernorm gains, whose values near 1 carry an fp32 rounding of 6e-8 against updates of about 1e-2
/// (the applied update p_after - p_before inherits it).
inline double sum_tolerance(const std::string& name) {
  return name.find("ln_") != std::string::npos && name.ends_with(".weight") ? 1e-4 : 1e-5;
}

/// The PPO run the shift-recorder tests record: 8 samples of 6 tokens after "a", 2 minibatches x 2 epochs (4
/// updates per phase), learning rates 1e-2 and gradients clipped at 0.05, so that clipping is active at every update.
inline PPOConfig recorded_ppo_config() {
  return {.seed = 5, .total_phases = 4, .batch_size = 8, .num_minibatches = 2, .batches_per_learning_phase = 2,
          .base_lr = 1e-2, .head_lr = 1e-2, .max_grad_norm = 0.05, .warmup_steps = 0, .gen_len = 6, .top_k = 0,
          .prefix = "a"};
}

/// Reward of the recorded run: the completion's length in bytes, modulo 3.
inline double length_mod_3(const std::string& text) { return static_cast<double>(text.size() % 3); }

/// A PPOTrainer of `policy` with length_mod_3, recorded_ppo_config() and the byte-level tokenizer, and a
/// ShiftRecorder already added to it that keeps every kind of tensor's per-datum shares dense (28 tensors for a
/// 2-layer GPT-2). Callbacks added later run after the recorder.
struct RecordedPPO {
  explicit RecordedPPO(ActorCritic<> policy)
      : trainer(policy, FunctionReward(&length_mod_3), recorded_ppo_config(), GPT2Tokenizer::byte_level()),
        recorder(std::make_shared<ShiftRecorder>(
            *policy->base, ShiftRecorderOptions{.units = Targets::All, .biases = true, .layernorms = true,
                                                .embeddings = true, .keep_dense = true})) {
    trainer.add_callback(recorder);
  }
  PPOTrainer<ActorCritic<>, FunctionReward<double (*)(const std::string&)>, FixedKL> trainer;
  std::shared_ptr<ShiftRecorder> recorder;
};

}  // namespace rlhf::test
