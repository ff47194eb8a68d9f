#pragma once
/// @file Umbrella header: includes every public header of the library.

#include <rlhf/version.hpp>
#include <rlhf/detail/error.hpp>
#include <rlhf/runtime.hpp>
#include <rlhf/io/atomic_file.hpp>
#include <rlhf/io/safetensors.hpp>
#include <rlhf/model/gpt2_config.hpp>
#include <rlhf/model/conv1d.hpp>
#include <rlhf/model/kv_cache.hpp>
#include <rlhf/model/gpt2.hpp>
#include <rlhf/adapters/adapter.hpp>
#include <rlhf/adapters/no_adapter.hpp>
#include <rlhf/adapters/lora.hpp>
#include <rlhf/tokenizer/gpt2_tokenizer.hpp>
#include <rlhf/tokenizer/batch_encode.hpp>
#include <rlhf/generation/sampling.hpp>
#include <rlhf/core/masked.hpp>
#include <rlhf/core/advantages.hpp>
#include <rlhf/core/logprobs.hpp>
#include <rlhf/model/value_head.hpp>
#include <rlhf/model/actor_critic.hpp>
#include <rlhf/rewards/reward.hpp>
#include <rlhf/ppo/kl.hpp>
#include <rlhf/ppo/losses.hpp>
#include <rlhf/ppo/config.hpp>
#include <rlhf/ppo/trainer.hpp>
