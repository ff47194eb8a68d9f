#pragma once
/// @file The default adapter policy: plain linear layers, no adapters.

#include <cstdint>

#include <rlhf/adapters/adapter.hpp>
#include <rlhf/model/conv1d.hpp>

namespace rlhf {

/// Adapter policy of a model whose linear layers are the plain GPT-2 Conv1D layers (full fine-tuning): every
/// projection, whatever its role, is a Conv1D and every parameter trains.
struct NoAdapter {
  using Linear = Conv1D;  ///< the layer type every projection uses

  static constexpr bool has_adapters = false;  ///< no adapters: the PPO reference is a frozen copy

  /// A Conv1D [in] -> [out] with weight ~ N(0, init_std); the role does not matter.
  static Linear make_linear(int64_t in, int64_t out, double init_std, LinearRole /*role*/) {
    return Linear(in, out, init_std);
  }

  /// Nothing to do: every parameter stays trainable.
  static void prepare_model(torch::nn::Module& /*model*/) {}
};

static_assert(AdapterPolicy<NoAdapter>);

}  // namespace rlhf
